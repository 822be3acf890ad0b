"""An embedding index over a folder of images: build, save/load (plain .npz + JSON, no pickle), search.

Search is exact: squared distances and `lax.top_k` on the accelerator, over chunks of queries, so a
million embeddings are searched without a million-by-million matrix (evaluation.knn).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from siamese_jax import evaluation
from siamese_jax.files import atomic_open

INDEX_FORMAT = "siamese-jax-index/1"


class IndexError_(ValueError):
    """An index file that cannot be used (missing, corrupt, built by another model)."""


@dataclasses.dataclass
class EmbeddingIndex:
    embeddings: np.ndarray  # float32 [N, E]
    paths: list[str]  # what each row is (a file path, or any name a library user gives it)
    model_fingerprint: str
    labels: Optional[np.ndarray] = None  # int [N], saved and loaded if a library user gives them (`embed` does not)
    # The directory relative paths were given from (`embed` run there); None: indexes written before
    # 2026-12-04, whose relative paths resolve from the current directory.
    root: Optional[str] = None
    # The folder the index file was loaded from (`load`; not saved): where its relative paths are
    # looked for when `root` is not where they are (the index and its folder copied to another machine).
    location: Optional[str] = None

    def __post_init__(self):
        # Checked here, not only in `load`: an index made from a notebook's own embeddings and names
        # with one name too few searched with k capped at the names, returned a row without a name,
        # and saved a file that `load` refused; a NumPy array of names failed `save` in json.
        self.embeddings = np.asarray(self.embeddings, np.float32)
        self.paths = [os.fspath(p) if isinstance(p, os.PathLike) else str(p) for p in self.paths]
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.paths):
            raise ValueError(f"EmbeddingIndex: embeddings must be [N, E] with one path (or name) per row, got "
                             f"{self.embeddings.shape} for {len(self.paths)} paths")
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"EmbeddingIndex: {len(self.labels)} labels for {len(self.paths)} rows")

    def __len__(self):
        return len(self.paths)

    def file_path(self, i: int) -> str:
        """Row i's file, usable from any current directory (`search` run elsewhere than `embed`), and
        after the folder `embed` ran in was copied elsewhere with the index in it: a relative path
        that is not under `root` but is beside the index file is taken from there (it printed the
        first machine's paths, and `--sheet` drew every neighbour as a grey tile, without a word)."""
        path = self.paths[i]
        if self.root is None or os.path.isabs(path) or os.path.abspath(os.getcwd()) == self.root:
            resolved = path
        else:
            resolved = os.path.join(self.root, path)
        if self.location is not None and not os.path.isabs(path) and not os.path.exists(resolved):
            beside = os.path.join(self.location, path)
            if os.path.exists(beside):
                return beside
        return resolved

    def search(self, query_embeddings: np.ndarray, k: int = 5, chunk_size: Optional[int] = None):
        """(distances [Q, k], indices [Q, k]) of the k nearest rows, nearest first; a k above the
        index's size gives every row (a search of a 3-image folder for 5 shows 3), where
        `evaluation.knn` raises: an evaluation protocol that asks for k neighbours needs k.

        Memory stays bounded for any Q, N and k: `knn` holds ~128 MiB of distances at a time
        (chunk_size=None; a fixed 1,024 queries made it 1,024 x N: 7.6 GB for a million rows), and
        re-ranks its k by their direct distances over blocks of ~64 MiB of queries."""
        k = min(evaluation.whole_k(k), len(self))
        distances, indices = evaluation.knn(np.asarray(query_embeddings, np.float32), self.embeddings, k,
                                            chunk_size=chunk_size)
        return distances, indices

    def save(self, path: str) -> None:
        """Writes `path` (.npz arrays) atomically; metadata is JSON inside the archive, not pickle."""
        meta = {"format": INDEX_FORMAT, "model_fingerprint": self.model_fingerprint, "paths": self.paths,
                "root": self.root}
        arrays = {"embeddings": np.asarray(self.embeddings, np.float32),
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
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":  # np.load reads other bytes as a pickle or a .npy
                    raise ValueError("not an .npz archive")
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta_json"].tobytes().decode())
                emb = z["embeddings"]
                labels = z["labels"] if "labels" in z else None
            if meta.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            paths, fingerprint = list(meta["paths"]), meta["model_fingerprint"]  # (a KeyError here is this error too)
        except Exception as e:
            raise IndexError_(f"{path}: not a siamese-jax index ({type(e).__name__}: {str(e)[:80]})") from None
        if emb.ndim != 2 or len(emb) != len(paths) or (labels is not None and len(labels) != len(paths)):
            raise IndexError_(f"{path}: inconsistent index ({emb.shape} embeddings"
                              + ("" if labels is None else f", {len(labels)} labels") + f" for {len(paths)} paths)")
        root = meta.get("root")
        return EmbeddingIndex(np.asarray(emb, np.float32), paths, fingerprint, labels,
                              root if isinstance(root, str) else None, os.path.dirname(os.path.abspath(path)))


def build_index(model, paths: Sequence[str], batch_size: int = 256,
                skip_unreadable: Optional[Callable[[str], None]] = None) -> EmbeddingIndex:
    """Embeds image files (in batches, so a large folder never sits in memory as pixels).

    A file that cannot be read is an `ImageError` naming it, unless `skip_unreadable` is given: then
    it is called with each such error's message and the file is left out of the index (a batch
    holding one is read again file by file, so only the bad files are lost)."""
    from siamese_jax.images import ImageError, read_image

    kept, chunks = [], []
    for start in range(0, len(paths), batch_size):
        batch = [os.fspath(p) for p in paths[start:start + batch_size]]
        try:
            chunks.append(model.embed(batch))
            kept += batch
            continue
        except ImageError:
            if skip_unreadable is None:
                raise
        readable = batch
        while True:  # checked file by file; one that goes bad before it is embedded: checked again
            still = []
            for path in readable:
                try:
                    read_image(path)
                    still.append(path)
                except ImageError as e:
                    skip_unreadable(str(e))
            if not still:
                break
            try:
                chunks.append(model.embed(still))
                kept += still
                break
            except ImageError:
                if len(still) == len(readable):  # every file read again: not a file's fault
                    raise
                readable = still
    if not kept:
        raise ImageError("none of the images could be read" if paths else "no images to index")
    return EmbeddingIndex(np.concatenate(chunks).astype(np.float32), kept, model.fingerprint(),
                          root=os.path.abspath(os.getcwd()))


def check_compatible(index: EmbeddingIndex, model, index_path: str = "index") -> None:
    if index.model_fingerprint != model.fingerprint():
        raise IndexError_(f"{index_path} was built by another model (fingerprint {index.model_fingerprint}, "
                          f"this model is {model.fingerprint()}), or by a version that read image files "
                          f"differently (before the evening of 2026-12-06: `images.READING`); pass the --model "
                          f"it was built with, or rebuild it with "
                          f"`siamese-embed FOLDER --out={index_path} --model=<this model>`")
