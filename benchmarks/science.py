"""The recipe matrix: single split vs K-fold ensemble, each without and with test-time augmentation.

Data sets (each prepared once under --workdir):
  hard        the embedded demo synthesized with `synthesize.preset: hard` (small faint lesions,
              noise, bias field; 150 patients, CT + MR), ingested with the shipped params;
  pneumonia   the shared PneumoniaMNIST subset (real chest X-rays, 2D 28^2, 3,882/524/624), through
              the MedMNIST source;
  proxy3d     optional: benchmarks/proxy3d.py's 28^3 shape-mask cohort in MedMNIST-3D format.

Recipes (shipped params otherwise, so the network plan picks the network):
  single      K = 1: train on train, select the epoch and fit calibration on val;
  kfold       K = --folds over train + val, the fold ensemble, calibration on out-of-fold predictions.
Each trained recipe is evaluated once with `evaluate.tta: flips`; its metrics.json carries the same
pipeline without test-time views (`tta_effect`: rule refitted on identity views), so "+TTA" rows cost
no training. Training time is the train stage's wall time on this machine.

    .venv/bin/python benchmarks/science.py --datasets hard,pneumonia --folds 5 --json results/science.json

Writes a markdown table (stdout and --markdown) and the raw rows (--json). Deterministic on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__import__("os").environ.get("RESDX_SHARED_DATA", REPO.parent / "shared" / "data"))


def base_params(work: Path) -> dict:
    raw = yaml.safe_load((REPO / "configs/params.yaml").read_text())
    raw["ingest"].update(out_dir=str(work / "ingested"), cache_dir=str(work / "cache"), splits_file=None)
    raw["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", system_metrics=False)
    raw["train"]["state_dir"] = str(work / "state")
    return raw


def prepare(name: str, work: Path, progress: bool) -> dict:
    """Params (raw dict) whose ingest output for data set `name` exists under `work`."""
    from pipeline.config import Params

    raw = base_params(work)
    if name == "hard":
        from pipeline.stages.ingest import run_ingest
        from pipeline.stages.synthesize import synthesize

        raw["synthesize"].update(preset="hard", out_dir=str(work / "demo"), manifest=str(work / "demo.csv"))
        raw["data"]["manifest"] = str(work / "demo.csv")
        p = Params.model_validate(raw)
        if not (work / "demo.csv").exists():
            synthesize(p.synthesize, seed=p.seed)
        run_ingest(p, manifest=p.data.manifest, progress=progress)
    else:
        from pipeline.sources.medmnist import run_medmnist

        flag, root = {"pneumonia": ("pneumoniamnist", SHARED / "medmnist" / "pneumoniamnist_subset.npz"),
                      "proxy3d": ("adrenalmnist3d", work / "adrenalmnist3d.npz")}[name]
        if name == "proxy3d" and not root.exists():
            import subprocess
            import sys

            subprocess.run([sys.executable, str(REPO / "benchmarks/proxy3d.py"), "--out", str(root)], check=True)
        raw["data"].update(source="medmnist", class_names=None)
        raw["data"]["medmnist"].update(flag=flag, root=str(root))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the subset's split sizes differ from the official ones
            run_medmnist(Params.model_validate(raw), progress=progress)
    return raw


def run_recipe(raw: dict, work: Path, recipe: str, folds: int, progress: bool) -> dict:
    from pipeline.config import Params
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.train import run_train

    raw = json.loads(json.dumps(raw))
    raw["split"]["folds"] = folds if recipe == "kfold" else 1
    raw["train"]["out_dir"] = str(work / recipe / "models")
    raw["evaluate"].update(out_dir=str(work / recipe / "reports"), tta="flips")
    p = Params.model_validate(raw)
    t0 = time.perf_counter()
    s = run_train(p, progress=progress)
    seconds = time.perf_counter() - t0
    run_evaluate(p)
    return rows_from(work / recipe / "models", work / recipe / "reports", recipe, raw["split"]["folds"], seconds,
                     s.members_trained)


def rows_from(models: Path, reports: Path, recipe: str, folds: int, seconds: float, members_trained: int) -> dict:
    """The "without" and "with" TTA rows of one trained and evaluated recipe, read from its outputs
    (so a `dvc exp run` of the same recipe gives the same row)."""
    m = json.loads((reports / "metrics.json").read_text())
    test, effect = m["test"], m["tta_effect"]
    network = json.loads((models / "plan.json").read_text())["network"]["choices"]
    common = {"recipe": recipe, "folds": folds, "train_seconds": round(seconds, 1),
              "members_trained": members_trained, "network": network,
              "calibration": m["calibration"], "referral": m["uncertainty"]["referral"]}
    without = dict(common, tta=False, auroc=effect["auroc_without"], ece=effect["ece_without"],
                   ece_calibrated=effect["ece_calibrated_without"])
    with_tta = dict(common, tta=True, auroc=test["auroc"], auroc_ci95=test.get("auroc_ci95"), ece=test["ece"],
                    ece_calibrated=test["ece_calibrated"])
    return {"without": without, "with": with_tta}


def table(rows: list[dict]) -> str:
    out = ["| data set | recipe | TTA | test AUROC [95% CI] | ECE before → after | T | train s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("auroc_ci95")
        auc = f"{r['auroc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        recipe = "single split" if r["recipe"] == "single" else f"K = {r['folds']} ensemble"
        out.append(f"| {r['dataset']} | {recipe} | {'flips' if r['tta'] else 'none'} | {auc} | "
                   f"{r['ece']:.3f} → {r['ece_calibrated']:.3f} | {r['calibration']['temperature']:.2f} | "
                   f"{r['train_seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="hard,pneumonia", help="comma-separated: hard, pneumonia, proxy3d")
    ap.add_argument("--recipes", default="single,kfold")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/resdx-science"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    rows = []
    for name in a.datasets.split(","):
        work = a.workdir / name
        work.mkdir(parents=True, exist_ok=True)
        raw = prepare(name, work, a.progress)
        for recipe in a.recipes.split(","):
            r = run_recipe(raw, work, recipe, a.folds, a.progress)
            for key in ("without", "with"):
                rows.append(dict(r[key], dataset=name))
            print(table(rows[-2:]).splitlines()[-2:], flush=True)
            if a.json:
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps(rows, indent=1))
    md = table(rows)
    print(md)
    if a.markdown:
        a.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
