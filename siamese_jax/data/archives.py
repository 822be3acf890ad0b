"""Readers for the original data files: Omniglot zips (zipfile + PIL) and MNIST idx .gz (gzip + NumPy).

No TensorFlow. Conventions match TFDS's omniglot/mnist builders so both sources give the same
labels: Omniglot `label` = NNNN - 1 from the file name NNNN_MM.png, `alphabet` = index into the
sorted names of all 50 alphabets (TFDS builds its ClassLabel as `sorted(alphabets)` over the union
of all four archives). Images are inverted to ink = 255.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from siamese_jax.data.dataset import ImageDataset
from siamese_jax.data.errors import DataError

# sorted() of the alphabet folder names in images_background.zip + images_evaluation.zip: exactly
# the names (and order) of TFDS's `alphabet` ClassLabel, so alphabet ids agree across sources.
OMNIGLOT_ALPHABETS: tuple[str, ...] = (
    "Alphabet_of_the_Magi", "Angelic", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian",
    "Asomtavruli_(Georgian)", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta",
    "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille",
    "Burmese_(Myanmar)", "Cyrillic", "Early_Aramaic", "Futurama", "Ge_ez", "Glagolitic",
    "Grantha", "Greek", "Gujarati", "Gurmukhi", "Hebrew",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)", "Japanese_(katakana)",
    "Kannada", "Keble", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "Malayalam", "Manipuri",
    "Mkhedruli_(Georgian)", "Mongolian", "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sanskrit", "Sylheti", "Syriac_(Estrangelo)",
    "Syriac_(Serto)", "Tagalog", "Tengwar", "Tibetan", "Tifinagh", "ULOG",
)
_ALPHABET_ID = {name: i for i, name in enumerate(OMNIGLOT_ALPHABETS)}

# Our split name -> archive file (relative to the archive root).
OMNIGLOT_FILES = {
    "background": "omniglot/images_background.zip",
    "evaluation": "omniglot/images_evaluation.zip",
    "small1": "omniglot/images_background_small1.zip",
    "small2": "omniglot/images_background_small2.zip",
}
MNIST_FILES = {
    "train": ("mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz"),
    "test": ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"),
}
LAKE_RUNS_FILE = "omniglot/all_runs.zip"

_OMNIGLOT_ENTRY = re.compile(
    r"^(?P<root>[^/]+)/(?P<alphabet>[^/]+)/character(?P<char>\d+)/(?P<label>\d+)_(?P<drawer>\d+)\.png$"
)
_OMNIGLOT_LAYOUT = "<root>/<Alphabet>/characterNN/NNNN_MM.png"


def _skipped(entry: str) -> bool:
    """Directory entries and macOS/hidden clutter are not images."""
    base = entry.rsplit("/", 1)[-1]
    return entry.endswith("/") or entry.startswith("__MACOSX/") or base.startswith(".")


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable zip archive ({e})") from e


def read_entry(zf: zipfile.ZipFile, entry: str, path: Path) -> bytes:
    try:
        return zf.read(entry)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as e:
        raise DataError(f"corrupt entry {entry} in {path} ({e})") from e


def decode_png(data: bytes, entry: str, path: Path) -> np.ndarray:
    """One black-on-white PNG -> uint8 [H, W] with ink = 255, background = 0."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        if image.mode == "1":  # Omniglot's 1-bit PNGs: True = white paper. 2x faster than convert("L").
            paper = np.asarray(image, dtype=bool)
            return np.where(paper, np.uint8(0), np.uint8(255))
        return 255 - np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode PNG {entry} in {path} ({e})") from e


def read_omniglot_zip(path: Path, split: str) -> ImageDataset:
    """All PNGs of one Omniglot archive, ordered by (label, drawer)."""
    path = Path(path)
    expected_root = Path(path.name).stem  # images_background.zip -> images_background/
    with open_zip(path) as zf:
        parsed = []  # (label, drawer, alphabet_id, entry)
        seen_label: dict[int, tuple[str, str]] = {}
        for entry in zf.namelist():
            if _skipped(entry):
                continue
            m = _OMNIGLOT_ENTRY.match(entry)
            if m is None or m["root"] != expected_root:
                raise DataError(
                    f"unexpected entry {entry} in {path} (expected {_OMNIGLOT_LAYOUT.replace('<root>', expected_root)})"
                )
            alphabet = m["alphabet"]
            if alphabet not in _ALPHABET_ID:
                raise DataError(f"unknown alphabet {alphabet!r} in entry {entry} of {path} (not one of the 50 Omniglot alphabets)")
            label = int(m["label"]) - 1
            where = (alphabet, m["char"])
            if seen_label.setdefault(label, where) != where:
                raise DataError(f"character id {m['label']} of {entry} in {path} is also used by {'/'.join(seen_label[label])}")
            parsed.append((label, int(m["drawer"]), _ALPHABET_ID[alphabet], entry))
        if not parsed:
            raise DataError(f"no PNG images in {path} (expected {_OMNIGLOT_LAYOUT.replace('<root>', expected_root)})")
        parsed.sort()

        first = decode_png(read_entry(zf, parsed[0][3], path), parsed[0][3], path)
        images = np.empty((len(parsed), *first.shape), np.uint8)
        for i, (_, _, _, entry) in enumerate(parsed):
            image = first if i == 0 else decode_png(read_entry(zf, entry, path), entry, path)
            if image.shape != first.shape:
                raise DataError(f"image {entry} in {path} is {image.shape}, others are {first.shape}")
            images[i] = image

    columns = np.array([p[:3] for p in parsed], dtype=np.int32)
    return ImageDataset(
        images=images,
        labels=columns[:, 0],
        name="omniglot",
        split=split,
        alphabets=columns[:, 2],
        alphabet_names=OMNIGLOT_ALPHABETS,
        drawers=columns[:, 1],
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (big-endian header, uint8 payload) inside a .gz."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot decompress {path} ({e})") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an idx file with magic {magic:#010x}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header says {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_mnist(images_path: Path, labels_path: Path, split: str) -> ImageDataset:
    images = _read_idx(Path(images_path), 0x00000803)  # ubyte, 3 dims
    labels = _read_idx(Path(labels_path), 0x00000801)  # ubyte, 1 dim
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    # frombuffer arrays are read-only views of the decompressed bytes; copy to own the memory.
    return ImageDataset(images=images.copy(), labels=labels.astype(np.int32), name="mnist", split=split)


@dataclasses.dataclass(frozen=True)
class LakeRun:
    """One of Lake et al.'s 20-way one-shot runs: match each test image to one of 20 training images."""

    name: str  # "run01"
    train_images: np.ndarray  # uint8 [20, 105, 105], ink = 255, in training/classNN.png order
    test_images: np.ndarray  # uint8 [20, 105, 105], in test/itemNN.png order
    answers: np.ndarray  # int32 [20]: answers[i] = index into train_images of test image i's class
    train_files: tuple[str, ...]  # zip entry names, e.g. "run01/training/class01.png"
    test_files: tuple[str, ...]


def read_lake_runs(path: Path) -> list[LakeRun]:
    """Parse all_runs.zip: runNN/{training,test}/*.png and runNN/class_labels.txt ("test train" per line)."""
    path = Path(path)
    with open_zip(path) as zf:
        names = [n for n in zf.namelist() if not _skipped(n)]
        run_names = sorted({n.split("/", 1)[0] for n in names if re.match(r"^run\d+/", n)})
        if not run_names:
            raise DataError(f"no runNN/ folders in {path} (expected runNN/training/*.png, runNN/test/*.png, runNN/class_labels.txt)")
        runs = []
        for run in run_names:
            train_files = tuple(sorted(n for n in names if n.startswith(f"{run}/training/") and n.endswith(".png")))
            test_files = tuple(sorted(n for n in names if n.startswith(f"{run}/test/") and n.endswith(".png")))
            labels_entry = f"{run}/class_labels.txt"
            if labels_entry not in names or not train_files or not test_files:
                raise DataError(f"{run}/ in {path} lacks training/*.png, test/*.png or class_labels.txt")
            text = read_entry(zf, labels_entry, path).decode("utf-8", errors="replace")
            pairs = dict(line.split() for line in text.splitlines() if line.strip() and len(line.split()) == 2)
            train_index = {f: i for i, f in enumerate(train_files)}
            try:
                answers = np.array([train_index[pairs[f]] for f in test_files], dtype=np.int32)
            except KeyError as e:
                raise DataError(f"{labels_entry} in {path} has no valid training image for {e.args[0]}") from e

            def decode_all(files):
                return np.stack([decode_png(read_entry(zf, f, path), f, path) for f in files])

            runs.append(LakeRun(run, decode_all(train_files), decode_all(test_files), answers, train_files, test_files))
    return runs
