"""`resdx`: one sub-command per pipeline stage. Thin: parse, call the stage, print a summary.

Every failure a user can fix is a `pipeline.errors.ResDxError`: printed as its code, message and
what to do, without a traceback (`resdx --debug ...` shows it).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="ResDx: reproducible CT/MRI diagnosis pipeline (ingest, train, evaluate, explain, register).\n\n"
         "Stages read configs/params.yaml (override with --params); `dvc repro` runs them in order.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_DEBUG = {"on": False}
PARAMS_OPT = typer.Option(Path("configs/params.yaml"), "--params", "-p", help="Params YAML (validated at load).")


def _quiet_libraries() -> None:
    # Readers warn on every private tag or experimental path; our reasons are specific already.
    warnings.filterwarnings("ignore", module="nibabel")
    warnings.filterwarnings("ignore", module="pydicom")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of a failure, and log the "
                                         "library errors behind `unexpected_error` reasons to stderr.")) -> None:
    _DEBUG["on"] = debug
    if debug:  # stays on this machine's terminal: library texts can quote paths and header values
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("pipeline").setLevel(logging.DEBUG)


def _params(path: Path):
    from pipeline.config import load_params

    return load_params(path)


@app.command()
def synthesize(params: Path = PARAMS_OPT) -> None:
    """Generate the demo cohort (DICOM CT series, NIfTI MRI, lesion masks) and its manifest."""
    from pipeline.stages.synthesize import synthesize as run

    p = _params(params)
    s = run(p.synthesize, seed=p.seed, progress=sys.stderr.isatty())
    table = Table(title="synthesize summary", show_header=False)
    table.add_row("patients / studies", f"{s.n_patients} / {s.n_studies}")
    table.add_row("CT (DICOM) / MR (NIfTI)", f"{s.n_ct} / {s.n_mr}  ({s.n_compressed} CT series RLE-compressed)")
    table.add_row("with lesion", str(s.n_positive))
    table.add_row("files", f"{s.n_files} ({s.n_bytes / 2**20:.0f} MiB)")
    table.add_row("outputs", f"{s.out_dir}/, manifest {s.manifest}")
    console.print(table)


@app.command()
def ingest(
    manifest: Path | None = typer.Option(None, "--manifest", "-m", help="Case table CSV (default: data.manifest)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: ingest.out_dir)."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Worker processes (default: ingest.workers)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Manifest -> normalized tensors, OUT/index.csv (ok/rejected + reason per row) and OUT/plan.json.

    With data.source=medmnist, reads the MedMNIST .npz named by data.medmnist.* instead
    (official splits kept) and writes the same outputs.
    """
    from pipeline.stages.ingest import run_ingest

    _quiet_libraries()
    p = _params(params)
    if workers:
        p = p.model_copy(update={"ingest": p.ingest.model_copy(update={"workers": workers})})
    if p.data.source == "medmnist":
        from pipeline.sources.medmnist import run_medmnist

        summary = run_medmnist(p, out_dir=out, progress=sys.stderr.isatty())
    else:
        summary = run_ingest(p, manifest=manifest, out_dir=out, progress=sys.stderr.isatty())
    _print_ingest(summary, out or p.ingest.out_dir)


def _print_ingest(s, out: Path) -> None:
    table = Table(title="ingest summary", show_header=False)
    table.add_row("manifest rows", str(s.n_rows))
    table.add_row("ok", f"[green]{s.n_ok}")
    table.add_row("rejected", f"[red]{s.n_rejected}" if s.n_rejected else "0")
    for code, n in sorted(s.reasons.items()):
        table.add_row(f"  {code}", str(n))
    table.add_row("by modality", ", ".join(f"{k}={v}" for k, v in sorted(s.by_modality.items())))
    table.add_row("ok per split", ", ".join(f"{k}={v}" for k, v in sorted(s.splits.items())))
    table.add_row("cache hits (read / tensors)", f"{s.n_cached} / {s.n_reused}")
    table.add_row("time", f"{s.seconds:.1f} s")
    table.add_row("outputs", f"{out}/index.csv, {out}/plan.json, {out}/tensors/")
    console.print(table)
    assert s.n_ok + s.n_rejected == s.n_rows


@app.command()
def train(
    ingest_dir: Path | None = typer.Option(None, "--data", help="Ingested folder (default: ingest.out_dir)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Model folder (default: train.out_dir)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Train the network the plan picks (MONAI ResNet 2D/3D or plain_cnn; model.* overrides), or the
    K members of a fold ensemble with split.folds K; keeps the best or last epoch (train.select).

    Runs on the GPU when there is one (bf16 autocast), else on the CPU (fp32, deterministic).
    For several GPUs: torchrun --nproc_per_node N -m pipeline.cli train
    """
    from pipeline.stages.train import run_train

    _quiet_libraries()
    p = _params(params)
    s = run_train(p, ingest_dir=ingest_dir, out_dir=out, progress=sys.stderr.isatty())
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title="train summary", show_header=False)
    net = s.network or {}
    table.add_row("network (plan)", ", ".join(f"{k}={v}" for k, v in net.items()) + f" on {s.device}")
    if p.split.folds > 1:
        trained = ", ".join(s.members_trained) or "none (cached)"
        table.add_row("fold members", f"{p.split.folds}; trained now: {trained}")
    table.add_row("cases train / val", f"{s.n_train} / {s.n_val}")
    table.add_row("best val AUROC", f"{s.best_val_auroc:.4f} (epoch {s.best_epoch})")
    table.add_row("epochs run", f"{s.epochs_run}{' (early stop)' if s.stopped_early else ''}")
    table.add_row("time", f"{s.seconds:.1f} s")
    table.add_row("MLflow run", f"{s.run_id} ({p.mlflow.tracking_uri})")
    table.add_row("outputs", f"{out or p.train.out_dir}/model.safetensors, model.json, plan.json, history.csv")
    console.print(table)


@app.command()
def evaluate(params: Path = PARAMS_OPT) -> None:
    """AUROC with 95% CIs (bootstrap, DeLong), operating point from val, calibration before/after
    temperature scaling, subgroups; writes reports/metrics.json, predictions.csv, plots, figures."""
    from pipeline.stages.evaluate import run_evaluate

    _quiet_libraries()
    p = _params(params)
    r = run_evaluate(p)
    table = Table("split", "n", "AUROC [95% CI]", "accuracy", "ECE before/after", "Brier", title="evaluate summary")
    for s in [k for k in ("val", "oof", "test") if k in r]:  # oof: out of fold, for a K-fold ensemble
        m = r[s]
        ci = m.get("auroc_ci95") or [None, None]
        table.add_row(s, str(m["n"]), f"{m.get('auroc')} [{ci[0]}, {ci[1]}]", str(m.get("accuracy")),
                      f"{m['ece']} / {m['ece_calibrated']}", str(m["brier_calibrated"]))
    for f in r.get("per_fold", []):
        table.add_row(f"fold {f['fold']}", str(f["n_held_out"]), f"held out {f['held_out_auroc']}, "
                      f"test {f['test_auroc']}", "", "", "")
    console.print(table)
    cal, ref = r["calibration"], r["uncertainty"]["referral"]
    console.print(f"{cal.get('method', 'temperature')}: T {cal['temperature']}, bias {cal.get('bias')}, threshold "
                  f"{cal['threshold']} ({cal['operating_point']}), fitted on {cal['fitted_on']}; TTA {cal['tta']}")
    console.print(f"referred to a human: {ref['n_referred']} of {ref['n']} test cases; error rate "
                  f"{ref['error_rate_all']} on all, {ref['error_rate_automatic']} on the rest; "
                  f"outputs in {p.evaluate.out_dir}/")


@app.command()
def explain(
    cases: list[str] = typer.Option(None, "--case", "-c", help="Explain only these case ids (repeatable)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Grad-CAM maps in native geometry (NIfTI, DICOM SC), sanity checks, and the HTML review report."""
    from pipeline.stages.explain import run_explain

    _quiet_libraries()
    p = _params(params)
    r = run_explain(p, case_ids=cases or None)
    table = Table(title="explain summary", show_header=False)
    table.add_row("cases", str(r["n_cases"]))
    for key, vals in r["sanity"].items():
        table.add_row(key, json.dumps(vals) if isinstance(vals, dict) else str(vals))
    table.add_row("report", r["report"])
    console.print(table)


@app.command()
def register(params: Path = PARAMS_OPT) -> None:
    """Log the model to MLflow as a pickle-free pyfunc, register a version (alias candidate) with
    provenance tags and a model card, and promote it to champion if it passes the gate."""
    from pipeline.stages.register import run_register

    _quiet_libraries()
    p = _params(params)
    r = run_register(p)
    gate = r["gate"]
    table = Table(title="register summary", show_header=False)
    table.add_row("model version", f"{r['model_name']} v{r['version']} ({', '.join(r['aliases'])})")
    table.add_row("gate", "[green]passed: champion" if gate.get("passed") else "[yellow]not promoted: " +
                  "; ".join(gate.get("reasons") or []))
    table.add_row("champion now", f"v{r['champion']}" if r.get("champion") else "none")
    table.add_row("model card", r["model_card"])
    table.add_row("load it", f"mlflow.pyfunc.load_model('models:/{r['model_name']}@champion')")
    console.print(table)


def _decision(action: str, version: str, reason: str, params: Path) -> None:
    from pipeline.tracking import registry

    _quiet_libraries()
    r = getattr(registry, action)(_params(params), version, reason)
    console.print(f"{action}d {r['model_name']} v{r['version']} ({r['who']}, {r['when']}): {r['reason']}; "
                  f"champion now: {r.get('champion') or 'none'}")


@app.command()
def promote(version: str = typer.Argument(..., help="Model version number."),
            reason: str = typer.Option(..., "--reason", "-r", help="Why (recorded in the version's tags)."),
            params: Path = PARAMS_OPT) -> None:
    """Make a version the champion by hand (bypasses the gate; who/when/why are recorded)."""
    _decision("promote", version, reason, params)


@app.command()
def demote(version: str = typer.Argument(..., help="Model version number."),
           reason: str = typer.Option(..., "--reason", "-r", help="Why (recorded in the version's tags)."),
           params: Path = PARAMS_OPT) -> None:
    """Withdraw a version: it loses the champion alias (recorded in tags)."""
    _decision("demote", version, reason, params)


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="DICOM folders and/or NIfTI files, one study each; "
                                       "dicomweb:<StudyInstanceUID>[/<SeriesInstanceUID>] for a study on pacs.url."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model URI (default models:/<name>@champion)."),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Folder for one JSON per study."),
    modality: str | None = typer.Option(None, help="CT or MR for NIfTI inputs (DICOM says it itself)."),
    saliency: bool = typer.Option(False, "--saliency", help="Also write a Grad-CAM NIfTI overlay (native grid) of "
                                  "the decided class, with the explain.* settings of the params."),
    dicom_results: bool = typer.Option(False, "--dicom-results", help="Also write standard DICOM results: a TID "
                                       "1500 SR, a Parametric Map of the saliency and a burned-in Secondary Capture. "
                                       "Stored into the source study (STOW-RS) for dicomweb: inputs; written to "
                                       "--dicom-out/<study-id>/ for local DICOM folders."),
    dicom_out: Path | None = typer.Option(None, "--dicom-out", help="Folder for local studies' DICOM results "
                                          "(default: OUT-dicom). PACS side: they carry the source's identity."),
    engine: str = typer.Option("local", help="local, or ray: the studies spread over the Ray cluster at --ray-address "
                               "(default ingest.ray_address; none: a private one), the model loaded once per worker."),
    ray_address: str | None = typer.Option(None, help="host:port of the Ray cluster's head (ray start --head)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Calibrated probabilities for new studies, through ingest's code and the model's own plan."""
    from pipeline.stages.predict import run_predict

    _quiet_libraries()
    p = _params(params)
    uri = model or f"models:/{p.register.model_name}@champion"
    r = run_predict(uri, [str(x) if str(x).startswith("dicomweb:") else x for x in paths], out, modality=modality,
                    saliency=saliency, tracking_uri=p.mlflow.tracking_uri, progress=sys.stderr.isatty(),
                    explain=p.explain, pacs=p.pacs, dicom_results=dicom_results, dicom_out=dicom_out, engine=engine,
                    ray_address=ray_address or p.ingest.ray_address)
    table = Table("study", "status", "result", title=f"predict: {r['model']['name']} v{r['model']['version']} "
                  f"({r['engine']['name']}, {r['engine']['workers']} worker(s))")
    for rec in r["records"]:
        if rec["status"] == "ok":
            probs = ", ".join(f"{k} {v:.3f}" for k, v in rec["probabilities"].items())
            result = f"{rec['decision'].get('class', rec['decision'].get('positive'))} ({probs})"
            dres = rec.get("dicom_results")
            if dres:
                result += (f"; SR/PM/SC {dres['sr']}/{dres['parametric_map']}/{dres['secondary_capture']} to "
                           f"{dres['stored_to']}" if dres.get("stored_to") else f"; no DICOM results: {dres['reason']}")
        else:
            result = rec.get("reason", "")
        table.add_row(rec["study_id"], rec["status"], result)
    console.print(table)
    console.print(f"{r['n_ok']} ok, {r['n_rejected']} rejected; JSON in {out}/")
    if r["n"] and r["n_ok"] == 0:
        raise typer.Exit(1)


pacs_app = typer.Typer(help="Work with a DICOMweb PACS (pacs.url in the params; credentials from the "
                       "environment: RESDX_PACS_TOKEN, or RESDX_PACS_USER + RESDX_PACS_PASSWORD).",
                       no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")


@pacs_app.command("push")
def pacs_push(
    folder: Path = typer.Argument(..., help="A folder of DICOM files (e.g. data/demo); other files are skipped."),
    manifest: Path | None = typer.Option(None, "--manifest", help="Also rewrite this manifest for the server..."),
    manifest_out: Path | None = typer.Option(None, "--manifest-out", help="...into this file: DICOM-folder rows "
                                             "become dicomweb:<StudyInstanceUID> (NIfTI rows stay local)."),
    params: Path = PARAMS_OPT,
) -> None:
    """Store every DICOM file under FOLDER into the PACS (STOW-RS), e.g. to try the PACS flow on the demo."""
    from pipeline.stages.pacs import push_folder, remote_manifest

    _quiet_libraries()
    p = _params(params)
    if (manifest is None) != (manifest_out is None):
        raise typer.BadParameter("--manifest and --manifest-out go together")
    r = push_folder(folder, p.pacs, progress=sys.stderr.isatty())
    console.print(f"stored {r['n_stored']} of {r['n_files']} DICOM files ({r['n_studies']} studies) in "
                  f"{r['seconds']:.1f} s; {r['n_other']} other files skipped")
    for code, n in r["failed_reasons"].items():
        console.print(f"  [red]{n} not stored:[/] {code}")
    if manifest is not None:
        m = remote_manifest(manifest, manifest_out)
        console.print(f"wrote {m['manifest']}: {m['n_remote']} of {m['n_rows']} rows read from {p.pacs.url}")
    if r["n_failed"]:
        raise typer.Exit(1)


@pacs_app.command("studies")
def pacs_studies(params: Path = PARAMS_OPT) -> None:
    """List the server's studies (StudyInstanceUID, modalities, instances): the UIDs `resdx predict dicomweb:` takes."""
    from pipeline.errors import RejectedCase
    from pipeline.stages.pacs import list_studies

    p = _params(params)
    try:
        studies = list_studies(p.pacs)
    except RejectedCase as err:
        console.print(f"[red]cannot list studies on {p.pacs.url}:[/] {err.reason} [dim]({err.code})[/]")
        raise typer.Exit(1) from None
    console.print(f"{len(studies)} studies on {p.pacs.url} (StudyInstanceUID, modalities, instances):")
    for s in studies:  # stdout, one tab-separated line each: the UIDs are the output (pipe them into predict)
        typer.echo(f"{s['study_uid']}\t{'/'.join(s['modalities'])}\t{s['n_instances']}")


review_app = typer.Typer(help="Readers' verdicts from the review report (reports/explain/report.html).",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


@review_app.command("import")
def review_import(file: Path = typer.Argument(..., help="The CSV the report's Export CSV button saved."),
                  reader: str = typer.Option(..., "--reader", "-r", help="Who reviewed: initials or a staff id."),
                  params: Path = PARAMS_OPT) -> None:
    """Check a reader's exported verdicts and store them as data.reviews_dir/READER.csv (nothing if any is wrong).

    Only for the current model and report's cases; importing a reader again for that report replaces their verdicts.
    `dvc repro` then re-runs evaluate and explain with them; ingest uses corrected labels if data.use_review_labels.
    """
    from pipeline.stages.review import import_review, summary_rows

    p = _params(params)
    table = Table(title=f"review import: {reader}", show_header=False)
    for row in summary_rows(import_review(p, file, reader), p):
        table.add_row(*row)
    console.print(table)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A DICOM series folder (or one DICOM file, e.g. a mosaic)."),
    out: Path = typer.Argument(..., help="Output .nii or .nii.gz."),
    series_uid: str | None = typer.Option(None, help="Pick this SeriesInstanceUID when SRC holds several."),
    max_gib: float = typer.Option(700 / 1024, help="Refuse a series whose volume (as float32), or any one file's "
                                  "decoded pixels, would need more than this many GiB (ingest.max_case_bytes)."),
) -> None:
    """Convert one DICOM series to NIfTI in its native grid (no resampling), like dcm2niix."""
    sys.modules.setdefault("requests", None)  # pydicom imports it only to fetch its test files: 45 ms of a convert
    from pipeline.errors import RejectedCase
    from pipeline.stages.convert import convert as run

    _quiet_libraries()
    try:
        vol = run(src, out, series_uid, max_bytes=int(max_gib * 2**30))
    except RejectedCase as err:
        console.print(f"[red]cannot convert:[/] {err.reason} [dim]({err.code})[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]wrote[/] {out}: shape {vol.data.shape}, voxel {tuple(round(s, 3) for s in vol.spacing)} mm")
    for note in vol.meta.get("notes", []):
        console.print(f"  note: {note}")


def main() -> None:  # console-script entry point
    from pipeline.errors import ConfigError, ManifestError, ResDxError

    try:
        app()
    except ResDxError as err:
        if _DEBUG["on"]:
            raise
        from rich.markup import escape

        console.print(f"[red]error {escape(f'[{err.code}]')}:[/] {escape(err.message)}", soft_wrap=True)
        if err.hint:
            console.print(f"  what to do: {escape(err.hint)}", soft_wrap=True)
        sys.exit(2 if isinstance(err, (ConfigError, ManifestError)) else 1)


if __name__ == "__main__":
    main()
