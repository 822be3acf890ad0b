"""Reading a person's own images the way the training data was read.

Any PIL-readable file (PNG, JPEG, grayscale, RGB, RGBA, palette, 16-bit), a PIL image or an array
becomes float32 [H, W] in [0, 1] (uint8 only inside `prepare`'s resize) with the training polarity
and levels: ink bright (1) on a black (0) background, as Omniglot's binary strokes are after
inversion. Dark-on-light images (Omniglot's own PNGs, a pen drawing on paper) are inverted; the
decision is made from the border pixels, which are background in a centred drawing. Then the levels
are stretched so that the background is 0 and the ink 1: a scan's off-white paper or grey pencil
would otherwise reach the network as a grey field it never saw in training (paper at 0.9 put two
different characters at distance 2.7, below the shipped threshold). A file's EXIF orientation is
applied, as an image viewer shows the file. Decoding is bounded: absurd dimensions and decompression
bombs are refused before pixels are decoded.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence, Union

import numpy as np

from siamese_jax.console import one_line

MAX_PIXELS = 40_000_000  # ~ a 6300x6300 image; far beyond any sensible glyph
MAX_SIDE = 20_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".pgm", ".pbm", ".ppm", ".pnm")
# How files are read, as a version: hashed into a model's fingerprint, so an index or a calibration
# built from files read another way is refused rather than silently stale. Change it whenever
# `prepare`'s output for some file changes. History: levels stretched and EXIF applied (2026-12-05
# 00:05), then five refinements of the same day up to a scanner's frame (9f4c495, 06:52); an index or
# calibration of those hours carried the first one's name and was accepted (the upgrade review of
# 2026-12-06: a grey-scan threshold 0.40 where these files need 1.05); a page's shading is taken out
# when the fitted surface explains a tenth of the border's spread, not half (2026-12-06, stop 48).
READING = "shaded-pages-2026-12-06"
# Images larger than this many pixels are resized as soon as they are read (the same resize, one image
# at a time), so a batch of phone photos does not sit in memory at full size.
_RESIZE_AT_ONCE_PIXELS = 512 * 512


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
    if img.mode == "La":  # premultiplied gray + alpha: PIL converts it only to LA
        img = img.convert("LA")
    if img.mode in ("P", "PA") or {"A", "a"} & set(img.getbands()) or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def ink_bright(gray: np.ndarray) -> np.ndarray:
    """Ink bright (1) on a black (0) background, whatever the image's polarity and levels.

    The background is the border's median (the border of a centred drawing is background); pixels
    further from it than its noise (6 robust standard deviations of the border, at least 8 grey
    levels) are ink. Ink darker than the background (a pen on paper, also on a dim grey photo of
    paper, which the old rule "border brighter than 0.5" took for light-on-dark and then erased) is
    inverted; which side is ink is decided by the ink's mass (area x contrast) on each side, so a
    speck of dust does not decide it. Then the levels are stretched: background to 0, the ink's 90th
    percentile to 1 (a dust speck brighter than faint pencil set the level at the 99th percentile of
    the brightest pixels; review of 2026-12-05). A page shaded across (a shadow, a vignette) has no
    one background level: there a quadratic surface fitted to the border is the background, and dark
    ink's contrast is taken relative to it. A binary image (Omniglot's PNGs) comes out exactly 0/1,
    inverted if it was dark-on-light; a blank page (nothing beyond its noise) comes out black, its
    noise not stretched."""
    if not np.isfinite(gray.sum()):  # one pass: a NaN or an infinity anywhere makes the sum one
        raise ImageError("the image has pixels that are not numbers (NaN or infinite)")
    depth = _frame_depth(gray)
    if depth:  # the page inside the frame is read on its own border; the frame becomes background
        return np.pad(ink_bright(gray[depth:-depth, depth:-depth]), depth)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = _upper_median(border)
    spread = 1.4826 * _upper_median(np.abs(border - np.float32(background)))
    noise = max(8.0 / 255.0, 6.0 * spread)
    deviation = gray - np.float32(background)
    surface = None
    if noise > 8.0 / 255.0 and min(gray.shape) >= 8:
        # An uneven border: a shadow or a vignette across the page (then no one level is its
        # background, and the border's spread lifts the noise floor above faint ink), or only noise.
        # A smooth surface fitted to the border takes the page's shading out when it explains a
        # tenth of that spread or more. Plain noise it does not explain (on 64 px, 0.93-1.0 of the
        # spread remains), and the flat background stays; on small images, where chance fits
        # explain more, the surface of a noisy page is nearly flat and reads it the same (within
        # 0.06). The rule was "half": a faint pencil stroke under a mild vignette (corners ~9%
        # darker: 0.5-0.6 of the spread remains) then met a noise floor lifted by the vignette and
        # vanished, though a weaker or a stronger vignette kept it (the review of stop 48).
        fitted, residual_spread = _border_surface(gray, border)
        if residual_spread < 0.9 * spread:
            surface = fitted
            deviation = gray - surface
            noise = max(8.0 / 255.0, 6.0 * residual_spread)
            background = float("nan")  # no single level: no identity shortcut below
    above, below = deviation[deviation > noise], deviation[deviation < -noise]
    up, down = float(above.sum()), -float(below.sum())
    if down > up or (down == up and background > 0.5):  # (a NaN background: a shaded page, not blank)
        background, deviation, ink_pixels = 1.0 - background, -deviation, -below
        if surface is not None:
            # Dark ink on a shaded page: light reflected is shade x reflectance, so the ink's contrast
            # fades with the shade; dividing by the page's level gives every stroke its own contrast.
            # Ink is chosen on the raw deviation (beyond the noise in grey levels: divided first,
            # deep-shadow noise passed for ink), and the page's level is floored at 0.1, so noise
            # next to black is not amplified without bound (review of 2026-12-05).
            shade = np.maximum(surface, np.float32(0.1))
            is_ink = deviation > noise
            ink_pixels = deviation[is_ink] / shade[is_ink]
            deviation = deviation / shade
    else:
        ink_pixels = above
    if ink_pixels.size == 0:  # a blank page: made black, its noise not stretched into strokes
        return np.clip(deviation, 0, 1).astype(np.float32, copy=False)
    k = (9 * (ink_pixels.size - 1)) // 10  # the 90th percentile, as an order statistic
    ink = float(np.partition(ink_pixels, k)[k])
    if background == 0.0 and ink == 1.0:  # already 0 and 1 (the deviation is the image, or 1 - it)
        return deviation.astype(np.float32, copy=False)
    return np.clip(deviation / np.float32(ink), 0, 1).astype(np.float32, copy=False)


def _ring(gray: np.ndarray, depth: int) -> np.ndarray:
    """The pixels `depth` steps in from the edge (0: the border), as one flat array."""
    h, w = gray.shape
    top, bottom = gray[depth, depth:w - depth], gray[h - 1 - depth, depth:w - depth]
    return np.concatenate([top, bottom, gray[depth + 1:h - 1 - depth, depth], gray[depth + 1:h - 1 - depth, w - 1 - depth]])


def _frame_depth(gray: np.ndarray) -> int:
    """The width of a frame around the whole image (a scanner's black edge, a white mount around a
    photo of a blackboard), or 0. A frame is a band of rings, at most a tenth of the shorter side
    deep, each ring nearly all (90%) at one level, a quarter of the range or more from the page's
    just inside it; that first page ring is mostly (75%) page, and the page is most (60%) of what the
    frame encloses. Without this `ink_bright` took a 2-px black frame for the background and the
    white page for ink. The last two conditions keep a tight crop of bold ink (background outside,
    ink-heavy rings inside: README asks users to crop to the ink) from reading as a frame: there the
    outer level is what most of the image is. Two medians decide the usual case (no frame)."""
    deepest = min(gray.shape) // 10
    if deepest < 2:
        return 0
    frame, page = _upper_median(_ring(gray, 0)), _upper_median(_ring(gray, deepest))
    if abs(frame - page) < 0.25:
        return 0
    at = lambda pixels, level: float(np.mean(np.abs(pixels - np.float32(level)) < 0.25))
    for depth in range(1, deepest + 1):
        ring = _ring(gray, depth)
        level = _upper_median(ring)
        if abs(level - page) < abs(level - frame):  # nearer the page than the frame: inside
            break
        if at(ring, frame) < 0.9:
            return 0
    if at(_ring(gray, 0), frame) < 0.9 or at(ring, page) < 0.75:
        return 0
    return depth if at(gray[depth:-depth, depth:-depth], page) >= 0.6 else 0


def _border_surface(gray: np.ndarray, border: np.ndarray) -> tuple[np.ndarray, float]:
    """A quadratic surface in (x, y) fitted to the border pixels (in `ink_bright`'s border order),
    refitted once without the pixels it fits worst (ink touching the edge), and the robust standard
    deviation of the border around it. Returns (surface [H, W], spread)."""
    h, w = gray.shape
    x, y = np.linspace(-1, 1, w, dtype=np.float32), np.linspace(-1, 1, h, dtype=np.float32)
    bx = np.concatenate([x, x, np.full(h, -1, np.float32), np.full(h, 1, np.float32)])
    by = np.concatenate([np.full(w, -1, np.float32), np.full(w, 1, np.float32), y, y])
    design = np.stack([np.ones_like(bx), bx, by, bx * bx, by * by, bx * by], axis=1)
    keep = np.ones(border.size, bool)
    for _ in range(2):
        coef = np.linalg.lstsq(design[keep], border[keep], rcond=None)[0].astype(np.float32)
        residual = border - design @ coef
        spread = 1.4826 * _upper_median(np.abs(residual[keep]))
        keep = np.abs(residual) <= max(3.0 * spread, 1.0 / 255.0)
    a, b, c, d, e, f = coef
    surface = (a + b * x[None, :] + c * y[:, None] + d * (x * x)[None, :] + e * (y * y)[:, None]
               + f * y[:, None] * x[None, :])
    return surface.astype(np.float32), float(spread)


def _upper_median(a: np.ndarray) -> float:
    """The median of an odd count, the upper of the two middle values of an even one (np.median's
    overhead was a third of reading a small PNG)."""
    return float(np.partition(a, a.size // 2)[a.size // 2])


def upright(img):
    """A PIL image turned as its EXIF orientation tag says (phone photos are stored sideways)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: the pixels as stored
        return img


def read_image(path: str) -> np.ndarray:
    """A file -> float32 [H, W] in [0, 1], ink bright. Every failure is an ImageError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image")
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if not os.path.isfile(path):  # a FIFO or device would block the read
        raise ImageError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file")
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
            # A file is read as a viewer shows it, its EXIF orientation applied. A PIL image or an
            # array passed in is taken as its pixels: PIL keeps the tag through `transpose`, so a
            # photo turned by hand would be turned twice.
            return ink_bright(_to_gray_float(upright(img)))
    except ImageError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise ImageError(f"{path}: {e}") from None  # e.g. `ink_bright`'s, which does not know the file
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except PermissionError as e:
        raise ImageError(f"{path}: cannot read it ({e.strerror})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode ({one_line(e)}; truncated or corrupt?)") from None


def as_gray(image) -> np.ndarray:
    """A path, PIL image or array -> float32 [H, W] in [0, 1], ink bright."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    try:
        from PIL import Image

        if isinstance(image, Image.Image):  # its pixels, as its array's (no EXIF turn: see `read_image`)
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

    images = list(images)
    if not images:
        raise ImageError("no images given")
    out = np.empty((len(images), size, size), np.uint8)
    gray, by_shape = {}, {}
    for i, image in enumerate(images):
        g = np.round(as_gray(image) * 255.0).astype(np.uint8)
        if g.size > _RESIZE_AT_ONCE_PIXELS:  # a photo: resized now (the resize is per image, so the
            out[i] = resize_uint8(g[None], size)[0]  # same pixels as in a batch)
        else:
            gray[i] = g
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
        # Hidden files and folders are skipped, as a file browser does: macOS's AppleDouble files
        # (`._name.png`, not images), `__MACOSX/` of a zip made on a Mac, `.thumbnails/`, `.git/`.
        # Sorted, so that a folder reached under two names (a link to it) is listed under the same one
        # whatever order the file system lists them in (ext4 lists in hash order).
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        found += [os.path.join(root, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                  and _not_special(os.path.join(root, f))]
    found.sort()
    if not found:
        raise ImageError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found


def _not_special(path: str) -> bool:
    """A regular file, or a dangling link (reported by name when read); not a FIFO or a device,
    whose read would block or never end."""
    return os.path.isfile(path) or not os.path.exists(path)
