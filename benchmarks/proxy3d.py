"""A 28^3 shape-mask cohort in MedMNIST's 3D .npz layout, for choosing the small-3D recipe.

The held-out set ResDx is checked on (28^3, binary, ~1:3.6, ~1,200/98/298 cases) is not here.
This proxy has its format, split sizes and imbalance, and a task of the same kind: binary
organ-shape masks (uint8 0..255, partial-volume edges) in which a positive case carries a
focal mass on the organ's outline. Masses range from obvious to sub-voxel and negatives carry
benign lobulations of overlapping size, so no recipe reaches 1.0; the ranking of recipes, not
the absolute AUROC, is what it is for. Deterministic: the same seed gives the same bytes.

    python benchmarks/proxy3d.py --out data/proxy/adrenalmnist3d.npz
    dvc exp run --temp -S data.source=medmnist -S data.medmnist.flag=adrenalmnist3d \
        -S data.medmnist.root=data/proxy -S ingest.splits_file=null
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

SIZE = 28
SPLITS = {"train": 1188, "val": 98, "test": 298}  # AdrenalMNIST3D's official counts
PREVALENCE = 1 / 4.6  # about 1:3.6


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid(grid: np.ndarray, centre, radii, rot) -> np.ndarray:
    d = (grid - np.asarray(centre)[:, None, None, None]).reshape(3, -1)
    local = rot.T @ d
    r = np.sqrt(((local / np.asarray(radii)[:, None]) ** 2).sum(0))
    return r.reshape(grid.shape[1:])


def one_case(rng: np.random.Generator, positive: bool) -> np.ndarray:
    g = np.mgrid[0:SIZE, 0:SIZE, 0:SIZE].astype(np.float32)
    centre = np.array([SIZE / 2] * 3) + rng.normal(0, 1.5, 3)
    rot = _rotation(rng)
    # Body and limbs of an inverted-V organ: three elongated ellipsoids sharing one end.
    field = _ellipsoid(g, centre, rng.uniform([8, 2.5, 1.5], [11, 4, 2.5]), rot)
    for sign in (-1, 1):
        limb_rot = rot @ _axis_rotation(sign * rng.uniform(0.4, 0.8))
        off = limb_rot[:, 0] * rng.uniform(3, 6)
        field = np.minimum(field, _ellipsoid(g, centre + off, rng.uniform([6, 1.5, 1.2], [9, 2.5, 2.0]), limb_rot))
    shape = field
    surface = np.argwhere(np.abs(field - 1.0) < 0.08)
    # Benign lobulations in both classes; the mass of a positive one overlaps their size range.
    n_lobes = rng.poisson(1.2)
    bumps = [(rng.uniform(1.2, 2.6), False) for _ in range(n_lobes)]
    if positive:
        bumps.append((rng.lognormal(np.log(3.0), 0.35), True))
    for radius, _ in bumps:
        if not len(surface):
            break
        p = surface[rng.integers(len(surface))]
        shape = np.minimum(shape, _ellipsoid(g, p, [radius] * 3, np.eye(3)))
    # Partial-volume edge, as a resampled mask has, and a little segmentation noise.
    soft = 1.0 / (1.0 + np.exp((shape - 1.0) * rng.uniform(6, 12)))
    soft = ndimage.gaussian_filter(soft + rng.normal(0, 0.08, soft.shape), 0.6)
    return (np.clip(soft, 0, 1) * 255).round().astype(np.uint8)


def _axis_rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def make(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SPLITS.items():
        labels = (rng.random(n) < PREVALENCE).astype(np.uint8)
        out[f"{split}_images"] = np.stack([one_case(rng, bool(y)) for y in labels])
        out[f"{split}_labels"] = labels[:, None]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/proxy/adrenalmnist3d.npz"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    arrays = make(a.seed)
    np.savez_compressed(a.out, **arrays)
    for s in SPLITS:
        y = arrays[f"{s}_labels"]
        print(f"{s}: {len(y)} cases, {int(y.sum())} positive")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
