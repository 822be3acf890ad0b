"""The plain in-memory dataset type every loader returns."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Single-channel images with class labels, as NumPy arrays.

    Polarity convention (all datasets): ink is bright. Pixel 255 = stroke/digit, 0 = background,
    as in MNIST. Omniglot PNGs (black strokes on white) are inverted at load time so that zero
    padding from resizing and affine transforms is background.
    """

    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int32 [N], global class id (Omniglot: character index, as TFDS `label`)
    name: str  # "omniglot" | "mnist"
    split: str  # our split name, e.g. "background", "evaluation", "small1", "train", "test"
    alphabets: Optional[np.ndarray] = None  # int32 [N], index into alphabet_names (Omniglot)
    alphabet_names: Optional[tuple[str, ...]] = None
    drawers: Optional[np.ndarray] = None  # int32 [N], Omniglot drawer id 1..20 (file NNNN_MM -> MM)

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W], got {self.images.dtype} {self.images.shape}")
        for field in ("labels", "alphabets", "drawers"):
            value = getattr(self, field)
            if value is not None and len(value) != n:
                raise ValueError(f"{field} has {len(value)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))

    def subset(self, mask_or_index) -> "ImageDataset":
        """The examples selected by a boolean mask or an index array (same metadata)."""
        take = lambda a: None if a is None else a[mask_or_index]
        return dataclasses.replace(
            self,
            images=self.images[mask_or_index],
            labels=self.labels[mask_or_index],
            alphabets=take(self.alphabets),
            drawers=take(self.drawers),
        )
