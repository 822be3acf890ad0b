"""An embedding index over a folder of images: build, save/load (plain .npz + JSON, no pickle), search.

Search is exact: squared distances and `lax.top_k` on the accelerator, over chunks of queries, so a
million embeddings are searched without a million-by-million matrix (evaluation.knn).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from siamese_jax import evaluation
from siamese_jax.files import atomic_open

INDEX_FORMAT = "siamese-jax-index/1"


class IndexError_(ValueError):
    """An index file that cannot be used (missing, corrupt, built by another model)."""


@dataclasses.dataclass
class EmbeddingIndex:
    embeddings: np.ndarray  # float32 [N, E]
    paths: list[str]  # what each row is (file path, or "split:i" for a dataset)
    model_fingerprint: str
    labels: Optional[np.ndarray] = None  # int [N] if known (dataset indexes)

    def __len__(self):
        return len(self.paths)

    def search(self, query_embeddings: np.ndarray, k: int = 5, chunk_size: int = 1024):
        """(distances [Q, k], indices [Q, k]) of the k nearest rows, nearest first."""
        k = min(int(k), len(self))
        return evaluation.knn(np.asarray(query_embeddings, np.float32), self.embeddings, k, chunk_size=chunk_size)

    def save(self, path: str) -> None:
        """Writes `path` (.npz arrays) atomically; metadata is JSON inside the archive, not pickle."""
        meta = {"format": INDEX_FORMAT, "model_fingerprint": self.model_fingerprint, "paths": self.paths}
        arrays = {"embeddings": self.embeddings.astype(np.float32),
                  "meta_json": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        if self.labels is not None:
            arrays["labels"] = np.asarray(self.labels, np.int64)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)

    @staticmethod
    def load(path: str) -> "EmbeddingIndex":
        if not os.path.isfile(path):
            raise IndexError_(f"{path}: no such index file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta_json"].tobytes().decode())
                emb = z["embeddings"]
                labels = z["labels"] if "labels" in z else None
            if meta.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
        except Exception as e:
            raise IndexError_(f"{path}: not a siamese-jax index ({type(e).__name__}: {str(e)[:80]})") from None
        if emb.ndim != 2 or len(emb) != len(meta["paths"]):
            raise IndexError_(f"{path}: inconsistent index ({emb.shape} embeddings for {len(meta['paths'])} paths)")
        return EmbeddingIndex(emb.astype(np.float32), list(meta["paths"]), meta["model_fingerprint"], labels)


def build_index(model, paths: Sequence[str], batch_size: int = 256) -> EmbeddingIndex:
    """Embeds image files (in batches, so a large folder never sits in memory as pixels)."""
    chunks = [model.embed(list(paths[i:i + batch_size])) for i in range(0, len(paths), batch_size)]
    return EmbeddingIndex(np.concatenate(chunks).astype(np.float32), [os.fspath(p) for p in paths], model.fingerprint())


def check_compatible(index: EmbeddingIndex, model, index_path: str = "index") -> None:
    if index.model_fingerprint != model.fingerprint():
        raise IndexError_(f"{index_path} was built by another model (fingerprint {index.model_fingerprint}, "
                          f"this model is {model.fingerprint()}); rebuild it with `embed`")
