"""Rebuild the bundled sample ``hsc_plugin/mri/sample`` from the full brain-mri-128 set.

    python -m hsc_plugin.mri._make_sample --src /work/shared/data/brain-mri-128

Per split and class: the file names are sorted, a seeded random subset is drawn
(``numpy.random.default_rng(seed)``, one generator for the whole run, classes and splits in a
fixed order), each image is resized from 128x128 to ``--size`` with Lanczos and saved as an
optimised 8-bit grayscale PNG under its original name. The output is deterministic. The script
also writes ``manifest.csv`` and the sample's ``README.md`` (provenance, licence, counts).
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from hsc_plugin.mri.data import CLASSES

_DEFAULT_OUT = Path(__file__).resolve().parent / "sample"
_SPLITS = ("train", "test")


def _select(files: list[Path], n: int, rng: np.random.Generator) -> list[Path]:
    if n >= len(files):
        return files
    keep = np.sort(rng.choice(len(files), size=n, replace=False))
    return [files[i] for i in keep]


def build(src: Path, out: Path, size: int, per_class: dict[str, int], seed: int) -> list[dict]:
    """Write the sample to ``out``; returns one manifest row per image."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for split in _SPLITS:
        if (out / split).exists():
            shutil.rmtree(out / split)
        for cls in CLASSES:
            src_dir = src / split / cls
            files = sorted(src_dir.glob("*.png"))
            if not files:
                raise FileNotFoundError(f"no PNG images in {src_dir}")
            dst_dir = out / split / cls
            dst_dir.mkdir(parents=True)
            for f in _select(files, per_class[split], rng):
                with Image.open(f) as img:
                    gray = img.convert("L")
                    if gray.size != (size, size):
                        gray = gray.resize((size, size), Image.LANCZOS)
                gray.save(dst_dir / f.name, format="PNG", optimize=True)
                rows.append({"split": split, "class": cls, "file": f.name,
                             "bytes": (dst_dir / f.name).stat().st_size})
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "class", "file", "bytes"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _readme(rows: list[dict], size: int, per_class: dict[str, int], seed: int) -> str:
    counts = {(r["split"], r["class"]): 0 for r in rows}
    for r in rows:
        counts[(r["split"], r["class"])] += 1
    table = ["| split | " + " | ".join(CLASSES) + " | total |",
             "|-------|" + "|".join("-" * (len(c) + 1) + ":" for c in CLASSES) + "|------:|"]
    for split in _SPLITS:
        n = [counts.get((split, c), 0) for c in CLASSES]
        table.append(f"| {split} | " + " | ".join(str(v) for v in n) + f" | {sum(n)} |")
    total_bytes = sum(r["bytes"] for r in rows)
    return f"""# Bundled brain-MRI sample

A small class-balanced sample of **brain-mri-128**, so that the MRI demo and the tests run on an
installed `hsc-plugin` without the full data set. Point `HSC_MRI_DATA` (or `--data`) at the full
set, or at the Kaggle download (`Training/`/`Testing/`), for real results.

Images: {size}x{size} 8-bit grayscale PNG (downsampled with Lanczos from the 128x128 originals),
layout `train/<class>/*.png`, `test/<class>/*.png`, file names as in brain-mri-128 (which are
those of the Kaggle release, e.g. `Tr-gl_0010.png`). `manifest.csv` lists every file.

{chr(10).join(table)}

{len(rows)} images, {total_bytes:,} bytes of PNG.

## How it was built

```
python -m hsc_plugin.mri._make_sample --src <brain-mri-128> --size {size} \\
    --train-per-class {per_class['train']} --test-per-class {per_class['test']} --seed {seed}
```

For each split (train, then test) and class (glioma, meningioma, notumor, pituitary), the file
names were sorted and a random subset drawn with `numpy.random.default_rng({seed})` (one generator
for the whole run). Deterministic: rerunning gives the same files.

## Provenance (from the brain-mri-128 README)

- brain-mri-128 is a de-duplicated 128x128 grayscale copy of the public Kaggle **Brain Tumor MRI
  Dataset** by Masoud Nickparvar (`masoudnickparvar/brain-tumor-mri-dataset`), taken from GitHub
  `ricardotran92/Brain-Tumor-MRI-Dataset` at commit `7d52d98829c02d787da76eac8b70a1e6bb6b5690`.
  Each image was converted to grayscale, centre-padded with black to a square (aspect ratio
  kept) and resized; exact duplicates and train images that are near-copies of test images were
  removed. The original Training/Testing split is kept as train/test.
- The Kaggle set combines the figshare "brain tumor dataset" by Jun Cheng
  (doi:10.6084/m9.figshare.1512427), SARTAJ "Brain Tumor Classification (MRI)" (Bhuvaji et al.,
  Kaggle 2020, doi:10.34740/KAGGLE/DSV/1183165) and Br35H "Brain Tumor Detection 2020"
  (A. Hamada, Kaggle).

## Licence

- The Kaggle dataset page gives the licence as **CC0 1.0 (Public Domain)** (the live page could
  not be checked when brain-mri-128 was built).
- The figshare part is **CC BY 4.0**; attribution required. Please cite: J. Cheng et al.,
  "Enhanced Performance of Brain Tumor Classification via Tumor Region Augmentation and
  Partition", PLoS ONE 10(10): e0140381 (2015).
- The licence terms of the SARTAJ and Br35H components were not verified.

## Caveats

The Kaggle split is by image, not by patient: neighbouring slices of one patient, and re-edited
copies of the same `notumor` scan, occur in both splits, so test accuracy is optimistic. It is
fine for comparing a model before and after compression on the same split. With only
{per_class['test']} test images per class, accuracies on this sample have a standard error of
about 2.5 points; use the full set for numbers worth reporting.

## Why {size} px and this many images

The sample is kept under 8 MB on disk (4 KiB blocks). At that budget, 96 px PNGs (about 1000
files) trained the demo model better than 64 px (about 1900 files) or 128 px (about 700 files):
resolution matters more than image count for this task.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="brain-mri-128 root (train/, test/)")
    ap.add_argument("--out", type=Path, default=_DEFAULT_OUT)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = build(args.src, args.out, args.size, per_class, args.seed)
    (args.out / "README.md").write_text(_readme(rows, args.size, per_class, args.seed))
    total = sum(r["bytes"] for r in rows)
    print(f"wrote {len(rows)} images ({total:,} bytes of PNG) to {args.out}")


if __name__ == "__main__":
    main()
