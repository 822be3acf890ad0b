"""Reading a person's own images the way the training data was read.

Any PIL-readable file (PNG, JPEG, grayscale, RGB, RGBA, palette, 16-bit), a PIL image or an array
becomes uint8 [H, W] with the training polarity: ink bright on a dark background. Dark-on-light
images (Omniglot's own PNGs, a pen drawing on paper) are inverted; the decision is made from the
border pixels, which are background in a centred drawing. Decoding is bounded: absurd dimensions
and decompression bombs are refused before pixels are decoded.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence, Union

import numpy as np

MAX_PIXELS = 40_000_000  # ~ a 6300x6300 image; far beyond any sensible glyph
MAX_SIDE = 20_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file."""


def _to_gray_float(img) -> np.ndarray:
    """PIL image of any mode -> float32 [H, W] in [0, 1], transparency composited onto white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return np.clip(a / top, 0, 1).astype(np.float32)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        return np.clip(a / (a.max() if a.max() > 1 else 1.0), 0, 1)
    if img.mode in ("P", "PA") or "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def ink_bright(gray: np.ndarray) -> np.ndarray:
    """Inverts dark-on-light images so that ink is bright (the border decides what background is)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 1.0 - gray if float(np.median(border)) > 0.5 else gray


def read_image(path: str) -> np.ndarray:
    """A file -> float32 [H, W] in [0, 1], ink bright. Every failure is an ImageError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image")
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # PIL warns (2 lines on stderr) above ~89M pixels; our own limit below is lower and is
            # reported as one ImageError, so its warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise ImageError(f"{path}: {w}x{h} pixels is too large (limit {MAX_PIXELS} pixels, {MAX_SIDE} per side)")
            if w < 2 or h < 2:
                raise ImageError(f"{path}: {w}x{h} pixels is too small to compare")
            img.load()
            return ink_bright(_to_gray_float(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except PermissionError as e:
        raise ImageError(f"{path}: cannot read it ({e.strerror})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode ({str(e).splitlines()[0] if str(e) else type(e).__name__}; truncated or corrupt?)") from None


def as_gray(image) -> np.ndarray:
    """A path, PIL image or array -> float32 [H, W] in [0, 1], ink bright."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return ink_bright(_to_gray_float(image))
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(image)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4)):
        raise ImageError(f"array of shape {a.shape} is not an image (expected [H, W] or [H, W, C], C = 1 to 4)")
    a = _unit_range(a)
    if a.ndim == 3:
        # As a PIL image of the same pixels reads (`_to_gray_float`): ITU-R 601 luma, and the
        # transparency of gray + alpha (C = 2) or RGBA (C = 4) composited onto white.
        colour, alpha = (a[..., :-1], a[..., -1]) if a.shape[-1] in (2, 4) else (a, None)
        gray = colour[..., 0] if colour.shape[-1] == 1 else colour @ np.float32([0.299, 0.587, 0.114])
        a = gray if alpha is None else gray * alpha + (1.0 - alpha)
    return ink_bright(np.clip(a, 0, 1).astype(np.float32))


def _unit_range(a: np.ndarray) -> np.ndarray:
    """Pixel values -> float32 in [0, 1], by the array's type: uint8 / 255 and uint16 / 65535 (as PIL
    reads those files, so a dark 16-bit image stays dark); a 0/1 mask and floats in [0, 1] as they
    are, a resize's overshoot past 1 clipped (it used to be divided by 255: a blank image); other
    integer types and floats well above 1 by their range (≤ 255: 8-bit values, else 16-bit)."""
    peak = a.max(initial=0)
    if a.dtype == np.bool_ or peak <= 1 or (np.issubdtype(a.dtype, np.floating) and peak <= 1.5):
        top = 1.0  # a 0/1 mask of any type, or floats in [0, 1]
    elif a.dtype in (np.uint8, np.int8):
        top = 255.0
    elif a.dtype in (np.uint16, np.int16):
        top = 65535.0
    else:
        top = 65535.0 if peak > 255.5 else 255.0
    return np.clip(a.astype(np.float32) / np.float32(top), 0, 1)


def prepare(images: Union[Sequence, np.ndarray], size: int) -> np.ndarray:
    """Images -> float32 [N, size, size, 1] in [0, 1], through the training data's own path:
    ink-bright uint8, antialiased resize to `size` (augment.resize_uint8), then / 255.

    Images of the same shape are resized together (one batched host resize per distinct shape):
    nothing here compiles, whatever the number and sizes of the images."""
    from siamese_jax.augment import resize_uint8

    gray = [np.round(as_gray(image) * 255.0).astype(np.uint8) for image in images]
    if not gray:
        raise ImageError("no images given")
    out = np.empty((len(gray), size, size), np.uint8)
    by_shape: dict = {}
    for i, g in enumerate(gray):
        by_shape.setdefault(g.shape, []).append(i)
    for indices in by_shape.values():
        out[indices] = resize_uint8(np.stack([gray[i] for i in indices]), size)
    return (out.astype(np.float32) / 255.0)[..., None]


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive, sorted). Errors name the folder."""
    if not os.path.exists(folder):
        raise ImageError(f"{folder}: no such folder")
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: not a folder")
    def unreadable(error: OSError):  # os.walk skips a folder it cannot list, silently, by default
        raise ImageError(f"{error.filename}: cannot list this folder ({error.strerror})")

    # Linked folders are followed (a folder of links to class folders is a common layout), each real
    # folder once, so a link cycle ends.
    seen: set = set()
    found = []
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    found.sort()
    if not found:
        raise ImageError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found
