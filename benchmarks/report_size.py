"""Size of the review report with its per-case viewer: per case and for a 200-case report.

    .venv/bin/python benchmarks/report_size.py [--cases 200] [--report reports/explain/report.html]

Builds reports from CT-like volumes (a body ellipse at 40 HU in air at -1000 HU, lungs at -850 HU, Gaussian
noise of 15 HU, a smooth saliency map) at three source sizes: the demo's largest grid (112 x 112 x 80), a
thin-slice CT (512 x 512 x 300, block-averaged to fit explain.viewer_max_voxels) and a worst case for gzip
(uniform noise over the whole int16 range). Each report repeats one encoded case `--cases` times, which
gives the same bytes as as many different cases of that kind. Prints the bytes per case, the 200-case
report's size and the bound (3 bytes per voxel at the limit, times 4/3 for base64). With --report, also
the size of an existing report (e.g. the demo's from `make repro`) and its bytes per embedded case.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def ct_like(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ii, jj, kk = np.ogrid[: shape[0], : shape[1], : shape[2]]
    x, y = (ii - shape[0] / 2) / (shape[0] * 0.45), (jj - shape[1] / 2) / (shape[1] * 0.38)
    vol = np.where(x**2 + y**2 < 1, 40.0, -1000.0) + np.zeros(shape)
    for side in (-0.45, 0.45):
        vol[np.broadcast_to(((x - side) / 0.3) ** 2 + (y / 0.5) ** 2 < 1, shape)] = -850.0
    vol = np.round(vol + rng.normal(0, 15, shape)).astype(np.int16)
    cam = np.exp(-(((ii - shape[0] * 0.6) / (shape[0] / 8)) ** 2 + ((jj - shape[1] * 0.4) / (shape[1] / 8)) ** 2
                   + ((kk - shape[2] / 2) / (shape[2] / 6)) ** 2)).astype(np.float32)
    return vol, cam


def main() -> int:
    from pipeline.config import ExplainConfig
    from pipeline.reporting.report import build_report
    from pipeline.reporting.viewer import niivue_script, viewer_case

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()
    limit = ExplainConfig().viewer_max_voxels
    rng = np.random.default_rng(0)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    kinds = {"demo largest 112x112x80": ct_like((112, 112, 80), rng),
             "thin-slice CT 512x512x300": ct_like((512, 512, 300), rng)}
    noise = rng.integers(-32768, 32767, size=(80, 80, 80), dtype=np.int16)
    kinds["worst case: uniform int16 noise 80^3"] = (noise, rng.random((80, 80, 80), dtype=np.float32))
    print(f"explain.viewer_max_voxels = {limit:,}; Niivue bundle {len(niivue_script()):,} bytes, once per report")
    print(f"bound per case: {limit:,} x 3 bytes x 4/3 = {limit * 4 / 2**20:.2f} MiB; {args.cases} cases "
          f"<= {args.cases * limit * 4 / 2**20:.0f} MiB")
    print(f"{'source':40s} {'grid':>14s} {'f':>2s} {'per case':>10s} {'encode s':>8s} {args.cases:>4d}-case report")
    for name, (vol, cam) in kinds.items():
        t0 = time.perf_counter()
        v = viewer_case(vol, cam, affine, "CT", limit)
        dt = time.perf_counter() - t0
        case = {"case_id": "c", "label": 1, "probability": 0.9, "decision": 1, "correct": True, "images": [],
                "viewer": v}
        doc = build_report({}, [dict(case, case_id=f"case-{n:03d}") for n in range(args.cases)])
        size = len(doc.encode("utf-8"))
        grid = "x".join(map(str, v.shape))
        print(f"{name:40s} {grid:>14s} {v.factor:>2d} {v.n_bytes / 2**20:8.2f} MiB {dt:8.2f} {size / 2**20:8.1f} MiB")
    if args.report:
        text = args.report.read_text(encoding="utf-8")
        n = len(re.findall(r'id="vd-\d+-vol"', text))
        size = args.report.stat().st_size
        print(f"{args.report}: {size / 2**20:.1f} MiB, {n} cases with a volume, "
              f"{(size - len(niivue_script())) / max(n, 1) / 2**20:.2f} MiB per case")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
