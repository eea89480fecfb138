"""MRI loader: both folder layouts, resizing, errors, and the bundled sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsc_plugin.mri.data import (
    CLASSES,
    MEAN,
    STD,
    bundled_sample_path,
    default_data_path,
    load_split,
)


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _make_root(root: Path, splits: tuple[str, str], classes: tuple[str, ...], ext: str,
               per_class: int = 3) -> None:
    """Class k is filled with grey level 40*(k+1) so labels can be read back from pixels."""
    for split in splits:
        for k, cls in enumerate(classes):
            for i in range(per_class):
                img = np.full((20, 30, 3), 40 * (k + 1), dtype=np.uint8)  # RGB, not square
                _write(root / split / cls / f"img{i}{ext}", img)


def test_kaggle_layout_jpg(tmp_path: Path) -> None:
    _make_root(tmp_path, ("Training", "Testing"), ("Glioma", "meningioma", "NOTUMOR",
                                                   "pituitary"), ".jpg")
    for split in ("train", "TEST", "Training"):
        ds = load_split(tmp_path, split, size=16, normalize=False)
        x, y = ds.tensors
        assert x.shape == (12, 1, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    # 30x20 padded to 30x30: top/bottom rows black, centre keeps the grey level (JPEG ~ lossy)
    centre = x[:, 0, 8, 8] * 255
    np.testing.assert_allclose(centre.numpy(), 40.0 * (y.numpy() + 1), atol=3)
    assert float(x[:, 0, 0, 8].max()) < 0.02


def test_lowercase_layout_png_normalised_and_capped(tmp_path: Path) -> None:
    _make_root(tmp_path, ("train", "test"), CLASSES, ".png", per_class=5)
    ds = load_split(tmp_path, "test", size=8, max_per_class=2, seed=1)
    x, y = ds.tensors
    assert x.shape == (8, 1, 8, 8) and torch.bincount(y).tolist() == [2, 2, 2, 2]
    raw = load_split(tmp_path, "test", size=8, max_per_class=2, seed=1, normalize=False)
    torch.testing.assert_close(x, (raw.tensors[0] - MEAN) / STD)


def test_old_class_names_and_partial_classes(tmp_path: Path) -> None:
    _make_root(tmp_path, ("Training", "Testing"), ("glioma_tumor", "no_tumor"), ".png")
    y = load_split(tmp_path, "train", size=8).tensors[1]
    assert sorted(set(y.tolist())) == [0, 2]


def test_modes_grayscale_rgba_palette(tmp_path: Path) -> None:
    d = tmp_path / "train" / "glioma"
    _write(d / "a.png", np.full((8, 8), 200, dtype=np.uint8))
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white but fully transparent -> black
    _write(d / "b.png", rgba, mode="RGBA")
    Image.new("P", (8, 8), 0).save(d / "c.bmp")
    x = load_split(tmp_path, "train", size=8, normalize=False).tensors[0]
    assert x.shape == (3, 1, 8, 8)
    assert float(x[0].mean()) == pytest.approx(200 / 255, abs=1e-3)
    assert float(x[1].max()) == 0.0


@pytest.mark.parametrize(
    ("setup", "exc", "match"),
    [
        ("missing_root", FileNotFoundError, "does not exist"),
        ("no_split", FileNotFoundError, "no split folder"),
        ("no_class", FileNotFoundError, "no class folders"),
        ("bad_class", ValueError, "unrecognised class"),
        ("no_images", FileNotFoundError, "no images"),
    ],
)
def test_clear_errors(tmp_path: Path, setup: str, exc: type[Exception], match: str) -> None:
    root = tmp_path / "data"
    if setup != "missing_root":
        root.mkdir()
    if setup == "no_split":
        (root / "validation").mkdir()
    if setup in ("no_class", "bad_class", "no_images"):
        (root / "Training").mkdir()
    if setup == "bad_class":
        (root / "Training" / "glioma").mkdir()
        (root / "Training" / "astrocytoma").mkdir()
    if setup == "no_images":
        (root / "Training" / "glioma").mkdir()
        (root / "Training" / "glioma" / "notes.txt").write_text("x")
    with pytest.raises(exc, match=match) as info:
        load_split(root, "train")
    assert str(root) in str(info.value)


def test_bundled_sample_is_balanced_and_small(monkeypatch: pytest.MonkeyPatch) -> None:
    root = bundled_sample_path()
    assert (root / "README.md").is_file()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 8_000_000
    counts = {}
    for split in ("train", "test"):
        ds = load_split(root, split, size=64)
        y = ds.tensors[1]
        counts[split] = torch.bincount(y, minlength=4).tolist()
        assert len(set(counts[split])) == 1 and counts[split][0] >= 50
        x = ds.tensors[0]
        assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5  # MEAN/STD fit
    monkeypatch.delenv("HSC_MRI_DATA", raising=False)
    assert default_data_path() == root
    monkeypatch.setenv("HSC_MRI_DATA", "/some/where")
    assert default_data_path() == Path("/some/where")
