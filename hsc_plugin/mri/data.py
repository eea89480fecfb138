"""Loader for the Kaggle "Brain Tumor MRI Dataset" folder layout.

A data root holds one folder per split (``Training``/``Testing`` as downloaded from Kaggle, or
``train``/``test`` as in the bundled sample; case-insensitive) and, inside each, one folder per
class. Any image Pillow reads is accepted. Every image is converted to grayscale exactly as the
bundled brain-mri-128 set was built (transparent pixels onto black, ITU-R 601 luma), padded with
black to a square so the anatomy keeps its aspect ratio, then resized with Lanczos.

The whole split is returned as one in-memory :class:`~torch.utils.data.TensorDataset`: the data
set is small (6k images of 128x128 are 400 MB as float32, 100 MB as the uint8 decode cache), and
batches cut from tensors in memory avoid all per-item Python overhead during training.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "bundled_sample_path",
    "default_data_path",
    "load_split",
]

CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
"""Class names; a label is the index into this tuple."""

MEAN: float = 0.171
"""Pixel mean of brain-mri-128 on a 0-1 scale (its README); the fixed normalisation."""

STD: float = 0.186
"""Pixel standard deviation of brain-mri-128 on a 0-1 scale (its README)."""

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "test": ("test", "testing"),
}
_CACHE_ENTRIES = 12_000  # two full splits of brain-mri; about 50 MB at 64 px


def bundled_sample_path() -> Path:
    """The small class-balanced sample of brain-mri-128 shipped inside the package.

    It lets the demo and the tests run on an installed library without the full data set.
    """
    path = Path(__file__).resolve().parent / "sample"
    if not path.is_dir():
        raise FileNotFoundError(f"bundled MRI sample not found at {path} (broken installation?)")
    return path


def default_data_path() -> Path:
    """``$HSC_MRI_DATA`` when set (the full data set), else the bundled sample."""
    env = os.environ.get("HSC_MRI_DATA")
    if env:
        return Path(env).expanduser()
    return bundled_sample_path()


def load_split(
    root: str | os.PathLike[str],
    split: str = "train",
    size: int = 64,
    max_per_class: int | None = None,
    seed: int = 0,
    *,
    normalize: bool = True,
) -> TensorDataset:
    """Load one split as ``TensorDataset(images, labels)``.

    Args:
        root: folder holding the split folders.
        split: ``"train"`` (also matches ``Training``), ``"test"`` (also ``Testing``) or the exact
            name of another split folder; case-insensitive.
        size: output resolution; images are ``(N, 1, size, size)``.
        max_per_class: keep at most this many images per class, a seeded random choice among the
            sorted file names (``None`` keeps all).
        seed: seed of that choice.
        normalize: return ``(pixel/255 - MEAN) / STD`` (the model's input); ``False`` returns
            pixels in [0, 1].

    Returns:
        float32 images of shape ``(N, 1, size, size)`` and int64 labels (indices into
        :data:`CLASSES`), ordered by class then file name.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    split_dir = _find_split_dir(Path(root), split)
    files_by_class = _find_class_files(split_dir)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    labels: list[int] = []
    for label, files in sorted(files_by_class.items()):
        if max_per_class is not None and len(files) > max_per_class:
            keep = np.sort(rng.choice(len(files), size=max_per_class, replace=False))
            files = [files[i] for i in keep]
        paths.extend(files)
        labels.extend([label] * len(files))
    images = np.empty((len(paths), 1, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        stat = path.stat()
        images[i, 0] = _decode(str(path), size, stat.st_mtime_ns, stat.st_size)
    x = torch.from_numpy(images).float().div_(255.0)
    if normalize:
        x.sub_(MEAN).div_(STD)
    return TensorDataset(x, torch.tensor(labels, dtype=torch.int64))


def _find_split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"MRI data root {root} does not exist or is not a folder")
    key = split.lower()
    wanted = next((names for names in _SPLIT_ALIASES.values() if key in names), (key,))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    matches = [p for p in subdirs if p.name.lower() in wanted]
    if not matches:
        found = ", ".join(p.name for p in subdirs) or "no sub-folders"
        raise FileNotFoundError(
            f"no split folder for split {split!r} in {root} (looked for "
            f"{'/'.join(wanted)}, case-insensitive; found: {found}). Expected the Kaggle layout "
            "<root>/Training|Testing/<class>/*.jpg or <root>/train|test/<class>/*.png"
        )
    if len(matches) > 1:
        raise ValueError(
            f"ambiguous split {split!r} in {root}: {', '.join(p.name for p in matches)}"
        )
    return matches[0]


def _canonical_class(name: str) -> str | None:
    """Map a folder name to a class: case, ``_``/``-``/spaces and a ``_tumor`` suffix ignored.

    Accepts the Kaggle names (``notumor``) and the older SARTAJ ones (``glioma_tumor``,
    ``no_tumor``).
    """
    key = re.sub(r"[^a-z]", "", name.lower())
    if key in CLASSES:
        return key
    for suffix in ("tumor", "tumour"):
        if key.endswith(suffix) and key[: -len(suffix)] in CLASSES:
            return key[: -len(suffix)]
    return "notumor" if key in ("notumour", "no", "normal") else None


def _find_class_files(split_dir: Path) -> dict[int, list[Path]]:
    subdirs = sorted(
        p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))
    )
    unknown = [p.name for p in subdirs if _canonical_class(p.name) is None]
    if unknown:
        raise ValueError(
            f"unrecognised class folder(s) {unknown} in {split_dir}; expected one folder per "
            f"class named {', '.join(CLASSES)} (case-insensitive)"
        )
    if not subdirs:
        raise FileNotFoundError(
            f"no class folders in {split_dir}; expected {', '.join(CLASSES)} (case-insensitive)"
        )
    files_by_class: dict[int, list[Path]] = {}
    for sub in subdirs:
        label = CLASSES.index(_canonical_class(sub.name))  # type: ignore[arg-type]
        if label in files_by_class:
            raise ValueError(f"two folders for class {CLASSES[label]!r} in {split_dir}")
        files_by_class[label] = sorted(
            p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
    if not any(files_by_class.values()):
        raise FileNotFoundError(
            f"no images in the class folders of {split_dir} "
            f"(looked for {', '.join(sorted(_IMAGE_SUFFIXES))})"
        )
    return files_by_class


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _decode(path: str, size: int, mtime_ns: int, nbytes: int) -> np.ndarray:
    """Decode one image to a ``size x size`` uint8 array.

    Cached on (path, size) plus the file's mtime and byte size, so reloading a split in the same
    process (train, then calibrate, then evaluate) costs nothing and an edited file is re-read.
    """
    del mtime_ns, nbytes  # part of the cache key only
    try:
        with Image.open(path) as img:
            img.load()
            gray = _to_gray(img)
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    w, h = gray.size
    if w != h:
        side = max(w, h)
        square = Image.new("L", (side, side), 0)
        square.paste(gray, ((side - w) // 2, (side - h) // 2))
        gray = square
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


def _to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale; transparent pixels are composited onto black, as brain-mri-128 was built."""
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return img.convert("L")
