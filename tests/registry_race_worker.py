"""One pipeline of the concurrent-registration test (tests/test_mlflow_server.py), run in its own process:

    python tests/registry_race_worker.py SPEC.json LABEL

It waits at a barrier (one file per pipeline in SPEC's `barrier` folder) until every pipeline of SPEC is
ready, so that they register at the same moment; then it runs the register stage (log, register, alias
`candidate`, promotion gate) once per models folder of its LABEL and writes what each returned to
SPEC's `out`/LABEL.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _wait_for_all(barrier: Path, labels: list[str], label: str, timeout_s: float = 120.0) -> None:
    (barrier / f"{label}.ready").touch()
    deadline = time.monotonic() + timeout_s
    while not all((barrier / f"{other}.ready").exists() for other in labels):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pipeline {label}: the others did not reach the barrier within {timeout_s:g} s")
        time.sleep(0.01)


def _summary(result: dict) -> dict:
    gate = result["gate"]
    return {"version": result["version"], "run_id": result["run_id"], "logged_model_uri": result["logged_model_uri"],
            "passed": gate["passed"], "champion_before": gate["champion_before"],
            "compared_with": (gate["comparison"] or {}).get("champion_version"), "reasons": gate["reasons"]}


def main(spec_path: str, label: str) -> int:
    from pipeline.config import params_from_dict
    from pipeline.stages.register import run_register

    spec = json.loads(Path(spec_path).read_text())
    params, mine = params_from_dict(spec["params"]), spec["pipelines"][label]
    _wait_for_all(Path(spec["barrier"]), sorted(spec["pipelines"]), label)
    results = [_summary(run_register(params, models_dir=models_dir, reports_dir=mine["reports_dir"]))
               for models_dir in mine["models_dirs"]]
    (Path(spec["out"]) / f"{label}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
