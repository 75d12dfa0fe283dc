"""Time per study of the PACS flow: retrieve (WADO-RS), predict, saliency, store (SR + PM + SC by STOW-RS).

    .venv/bin/python benchmarks/pacs.py --studies 20            # after `make repro` (needs its champion)

Starts its own Orthanc (tools/orthanc.py) on a free port in a temporary folder, pushes the demo
cohort's CT studies (data/demo, from `make repro`), then runs `resdx predict`'s code on the first
N of them by StudyInstanceUID with --dicom-results, twice: the first pass retrieves every instance,
the second finds them in the cache. Prints the per-study median and mean of each step (seconds)
and the instances per study; `--json` writes them too. The model is the registered champion of the
params' tracking store (`models:/<register.model_name>@champion`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from pipeline.config import load_params
    from pipeline.stages.pacs import list_studies, push_folder
    from pipeline.stages.predict import run_predict
    from tools.orthanc import start

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20, help="CT studies to predict (default 20)")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--params", type=Path, default=REPO / "configs" / "params.yaml")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    params = load_params(args.params)
    uri = f"models:/{params.register.model_name}@champion"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = start(tmp / "orthanc")
        try:
            cfg = params.pacs.model_copy(update={"url": server.dicomweb_url, "cache_dir": tmp / "cache"})
            t0 = time.perf_counter()
            pushed = push_folder(args.data, cfg, progress=False)
            push_s = time.perf_counter() - t0
            uids = [s["study_uid"] for s in list_studies(cfg) if "CT" in s["modalities"]][: args.studies]
            refs = [f"dicomweb:{u}" for u in uids]
            passes = {}
            for name in ("first", "cached"):
                t0 = time.perf_counter()
                r = run_predict(uri, refs, tmp / name, tracking_uri=params.mlflow.tracking_uri, progress=False,
                                explain=params.explain, pacs=cfg, dicom_results=name == "first")
                passes[name] = {"wall_s": time.perf_counter() - t0, "records": r["records"]}
        finally:
            server.stop()
    out = {"n_studies": len(uids), "push": {"files": pushed["n_stored"], "seconds": round(push_s, 2)}}
    print(f"pushed {pushed['n_stored']} DICOM files in {push_s:.1f} s; {len(uids)} CT studies predicted")
    print(f"{'pass':8} {'step':12} {'median_s':>9} {'mean_s':>9}")
    for name, p in passes.items():
        ok = [x for x in p["records"] if x["status"] == "ok"]
        steps = {}
        for step in ("retrieve_s", "predict_s", "saliency_s", "store_s", "total_s"):
            vals = [x["timing"][step] for x in ok if step in x["timing"]]
            if vals:
                steps[step] = {"median": round(statistics.median(vals), 3), "mean": round(statistics.fmean(vals), 3)}
                print(f"{name:8} {step:12} {steps[step]['median']:9.3f} {steps[step]['mean']:9.3f}")
        inst = [x["timing"].get("instances_retrieved", 0) + x["timing"].get("instances_cached", 0) for x in ok]
        out[name] = {"ok": len(ok), "wall_s": round(p["wall_s"], 2), "steps": steps,
                     "instances_per_study": statistics.median(inst) if inst else 0,
                     "retrieved": sum(x["timing"].get("instances_retrieved", 0) for x in ok),
                     "dicom_results": sum(bool(x.get("dicom_results", {}).get("stored_to")) for x in ok)}
        print(f"{name:8} ok {len(ok)}/{len(p['records'])}, wall {p['wall_s']:.1f} s, instances retrieved "
              f"{out[name]['retrieved']}, results stored {out[name]['dicom_results']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if all(out[n]["ok"] == len(uids) for n in passes) else 1


if __name__ == "__main__":
    sys.exit(main())
