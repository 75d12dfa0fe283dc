"""Predict stage: new studies (DICOM folders/files, NIfTI files) through a registered model.

The model comes from the registry (``models:/<name>@champion`` by default) and carries its own
preprocessing plan, calibration and threshold, so a study is read and preprocessed by the same
code and plan as the training data (see `pipeline.tracking.serving_model`). One JSON per study in OUT:
calibrated probabilities by class name, the decision at the registered threshold, the model's
name and version, or the reason the study was rejected. A bad study is reported, never fatal.
A multi-label model gives every label its own probability (they need not sum to 1) and decision
(`decision.labels`: decided, probability, threshold, margin per label; `decision.positive` names the
labels decided present); it refers a study when any label is within the band or the views disagree.

No PHI in outputs: a study is named ``study-<hash>``, a short hash of its absolute input path.
Folder and file names are not used: they often hold patient names or record numbers. The
same path always gives the same id (`study_id`), so a user can map results back locally.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.config import ExplainConfig, PacsConfig
from pipeline.errors import ConfigError, RegistryError, unexpected_reason


def study_id(path: Path | str) -> str:
    """``study-`` + 12 hex digits of BLAKE2b over the absolute, normalised path."""
    return "study-" + hashlib.blake2b(os.path.abspath(os.fspath(path)).encode(), digest_size=6).hexdigest()


def resolve_model_version(model_uri: str) -> tuple[str | None, str | None]:
    """(registered name, version) for ``models:/name@alias`` or ``models:/name/version``; else (None, None)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        return None, None
    rest = model_uri[len("models:/"):].strip("/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
        name, _, version = rest.partition("/")
        if name.startswith("m-") and not version:
            return None, None  # a logged model id, not a registered version
        return name, version or None
    except MlflowException:
        return None, None


def load_registered(model_uri: str):
    """`mlflow.pyfunc.load_model` and the ResDx implementation behind it."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.registry import load_pyfunc

    try:
        pyfunc = load_pyfunc(model_uri)
    except (MlflowException, OSError) as err:
        raise RegistryError(f"cannot load {model_uri}: {str(err)[:300]}",
                            hint="check --model (models:/NAME@ALIAS or models:/NAME/VERSION) and mlflow.tracking_uri; "
                                 "resdx register creates the first version") from None
    impl = pyfunc.unwrap_python_model()
    if not hasattr(impl, "prepare_study"):
        raise RegistryError(f"{model_uri} is not a ResDx model (no study input)")
    return pyfunc, impl


def explain_study(impl, prep, cfg):
    """The map of the class the calibrated decision chose (the explain stage's own call, with the `explain`
    settings `cfg`), on the native grid."""
    import torch

    from pipeline.core.saliency import explain_case, to_native

    ex = explain_case(impl.classifier, torch.from_numpy(prep.tensor), cfg.class_index, cfg.method, cfg.target_layer,
                      cfg.shifts, cfg.reflect)
    native = ex.cam if ex.cam.ndim == 2 else to_native(ex.cam, prep.tensor_affine, prep.native_shape,
                                                        prep.native_affine)
    return ex, native


def _write_saliency(native: np.ndarray, prep, out: Path, sid: str) -> str:
    from pipeline.core.volume import Volume
    from pipeline.io.nifti import write_nifti

    name = f"{sid}_saliency.nii.gz"
    write_nifti(Volume(data=np.asarray(native, dtype=np.float32), affine=np.asarray(prep.native_affine), meta={}),
                out / name)
    return name


def predict_one(impl, path: Path | str, modality: str | None = None) -> tuple[dict, dict | None]:
    """One study -> (result fields, preprocessing record or None when rejected)."""
    from pipeline.errors import RejectedCase

    rec: dict = {"status": "rejected", "reason_code": "", "reason": "", "modality": None, "probabilities": None,
                 "decision": None, "uncertainty": None, "referral": None, "notes": []}
    try:
        prep = impl.prepare_study(path, modality)
        a = impl.assess_tensors(prep.tensor[None])
    except RejectedCase as err:
        rec.update(reason_code=err.code, reason=err.reason)
        return rec, None
    except Exception as err:  # noqa: BLE001 - one broken study must never stop the batch
        rec.update(reason_code="unexpected_error", reason=unexpected_reason(err, "reading the study"))
        return rec, None
    probs, rule = a.probs[0], impl.rule
    if rule.multi_label:
        decision, why = _label_decisions(impl, a)
    else:
        k = int(a.decisions[0])
        decision = {"class": impl.class_names[k], "index": k, "rule": rule.rule_text(),
                    "threshold": rule.threshold if rule.binary else None}
        margin = float(rule.margin(a.probs)[0])
        why = [f"decision margin {margin:.3f} < {rule.refer_margin:.3f} log-odds (band {rule.refer_band:g})"
               ] if margin < rule.refer_margin else []
    if rule.refer_spread is not None and a.uncertainty[0] > rule.refer_spread:
        why.append(f"views' spread {a.uncertainty[0]:.3f} > {rule.refer_spread:g}")
    rec.update(status="ok", modality=prep.modality, notes=prep.notes, decision=decision,
               probabilities={n: float(p) for n, p in zip(impl.class_names, probs)},
               uncertainty={"spread": float(a.uncertainty[0]), "n_views": a.n_views, "tta": rule.tta,
                            "measure": "std of the calibrated probability over fold members x test-time views"},
               referral={"refer": bool(a.referred[0]), "reasons": why,
                         "rule": {"band": rule.refer_band, "margin_log_odds": rule.refer_margin,
                                  "max_spread": rule.refer_spread}})
    return rec, prep


def _label_decisions(impl, a) -> tuple[dict, list[str]]:
    """Multi-label: one decision per label at its own threshold, and the labels within the referral band."""
    rule, names = impl.rule, impl.class_names
    probs, decided, margins = a.probs[0], a.decisions[0], rule.label_margins(a.probs)[0]
    labels = {n: {"decision": int(d), "probability": float(p), "threshold": float(t), "margin": float(m)}
              for n, d, p, t, m in zip(names, decided, probs, rule.label_thresholds, margins)}
    decision = {"positive": [n for n, d in zip(names, decided) if d], "labels": labels, "rule": rule.rule_text()}
    why = [f"{n}: decision margin {m:.3f} < {rule.refer_margin:.3f} log-odds (band {rule.refer_band:g})"
           for n, m in zip(names, margins) if m < rule.refer_margin]
    return decision, why


def label_results(impl, rec: dict) -> list:
    """The decisions of one predicted study as `LabelResult`s for the SR: the positive class of a binary
    model (at its threshold), every class of a multi-class one, every label of a multi-label one."""
    from pipeline.io.dicom_results import LabelResult

    rule, refer, dec = impl.rule, bool(rec["referral"]["refer"]), rec["decision"]
    if rule.multi_label:
        return [LabelResult(n, d["probability"], bool(d["decision"]), d["threshold"], dec["rule"], refer)
                for n, d in dec["labels"].items()]
    probs = rec["probabilities"]
    if rule.binary:
        positive = impl.class_names[1]
        return [LabelResult(positive, probs[positive], dec["class"] == positive, rule.threshold, dec["rule"], refer)]
    return [LabelResult(n, p, dec["class"] == n, None, dec["rule"], refer) for n, p in probs.items()]


def model_identity(model_uri: str, name: str | None, version: str | None):
    from pipeline.io.dicom_results import ModelIdentity, software_version

    alias = model_uri.rsplit("@", 1)[1] if model_uri.startswith("models:/") and "@" in model_uri else None
    return ModelIdentity(uri=model_uri, name=name, version=version, alias=alias, software_version=software_version())


def _dicom_results(impl, rec: dict, source: Path, native, explained: str, identity, pacs: PacsConfig | None,
                   folder: Path | None) -> dict:
    """SR + Parametric Map + SC for one study: stored into its study on the PACS (`pacs`), or saved in `folder`.
    Returns what was written (counts, never UIDs: the record is research-side)."""
    from pipeline.io.dicom_overlay import save_images
    from pipeline.io.dicom_results import result_objects, write_results
    from pipeline.sources.dicomweb import store

    objs = result_objects(source, label_results(impl, rec), identity, native, explained,
                          max_bytes=impl.plan.reader.max_case_bytes)
    counts = {k: len(v) for k, v in objs.items()}
    if pacs is not None:
        store([ds for v in objs.values() for ds in v], pacs)
        return {"stored_to": "pacs", **counts}
    write_results(folder, *objs["sr"], *objs["parametric_map"])  # sr.dcm, pmap.dcm
    save_images(objs["secondary_capture"], folder / "sc")
    return {"stored_to": "folder", **counts}


def _reject(rec: dict, err: Exception, doing: str) -> dict:
    from pipeline.errors import RejectedCase

    if isinstance(err, RejectedCase):
        return rec | {"code": err.code, "reason": err.reason}
    return rec | {"code": "unexpected_error", "reason": unexpected_reason(err, doing)}


@dataclass(frozen=True)
class PredictJob:
    """What every study of one `run_predict` call shares (picklable: it travels to Ray workers)."""

    out: Path
    modality: str | None
    saliency: bool
    dicom_results: bool
    dicom_out: Path | None
    explain: ExplainConfig
    pacs: PacsConfig
    model_fields: dict
    identity: object  # io.dicom_results.ModelIdentity: who made the DICOM results, computed once


def predict_path(impl, job: PredictJob, i: int, path: Path | str) -> dict:
    """One study end to end: retrieval (dicomweb:), prediction, map, DICOM results; its JSON record."""
    from pipeline.errors import RejectedCase
    from pipeline.sources.dicomweb import is_remote, parse_ref, retrieve

    pacs, ex_cfg, out = job.pacs, job.explain, job.out
    remote, t0 = is_remote(path), time.perf_counter()
    sid = study_id(f"{pacs.url.rstrip('/')}/{os.fspath(path)}" if remote else path)
    timing: dict = {}
    rec, prep, local = None, None, Path(path)
    if remote:
        try:
            got = retrieve(parse_ref(path), pacs, job.modality, impl.plan.reader.max_case_bytes)
            local = got.folder
            timing |= {"retrieve_s": round(got.seconds, 3), "instances_retrieved": got.n_retrieved,
                       "instances_cached": got.n_cached}
        except (RejectedCase, ValueError) as err:
            why = err if isinstance(err, RejectedCase) else RejectedCase("bad_reference", str(err))
            rec = {"status": "rejected", "reason_code": why.code, "reason": why.reason}
    if rec is None:
        t1 = time.perf_counter()
        rec, prep = predict_one(impl, local, job.modality)
        timing["predict_s"] = round(time.perf_counter() - t1, 3)
    rec = {"study_id": sid, "input_index": i, "source": "dicomweb" if remote else "local", **rec,
           "model": job.model_fields, "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}
    dicom_input = prep is not None and local.is_dir()
    native, explained = None, ""
    if prep is not None and (job.saliency or (job.dicom_results and dicom_input)):
        t1 = time.perf_counter()
        try:
            ex, native = explain_study(impl, prep, ex_cfg)
            explained = impl.class_names[ex.explained_class]
            if job.saliency:
                rec["saliency"] = _write_saliency(native, prep, out, sid)
                rec["saliency_class"] = explained
        except Exception as err:  # noqa: BLE001 - a failed map must not lose the prediction
            rec["saliency"] = None
            rec["saliency_error"] = unexpected_reason(err, "computing the saliency map", sid)
        timing["saliency_s"] = round(time.perf_counter() - t1, 3)
    if job.dicom_results and prep is not None:
        t1 = time.perf_counter()
        if not dicom_input:
            rec["dicom_results"] = {"code": "not_dicom_input",
                                    "reason": "DICOM results need a DICOM source series (this is NIfTI)"}
        else:
            try:
                rec["dicom_results"] = _dicom_results(
                    impl, rec, local, native, explained, job.identity, pacs if remote else None,
                    None if remote else Path(job.dicom_out or out.with_name(out.name + "-dicom")) / sid)
            except Exception as err:  # noqa: BLE001 - a failed write must not lose the prediction
                rec["dicom_results"] = _reject({"stored_to": None}, err, "writing the DICOM results")
        timing["store_s"] = round(time.perf_counter() - t1, 3)
    rec["timing"] = timing | {"total_s": round(time.perf_counter() - t0, 3)}
    return rec


def _load_on_worker(model_uri: str, tracking_uri: str, registry_uri: str):
    """A Ray worker's copy of the model: loaded once, when the worker starts (`ray_engine.ray_actor_map`)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    return load_registered(model_uri)[1]


def _predict_on_worker(impl, item: tuple[PredictJob, int, str]) -> dict:
    job, i, path = item
    return predict_path(impl, job, i, path)


def run_predict(model_uri: str, paths: list[Path | str], out_dir: Path | str, modality: str | None = None,
                saliency: bool = False, tracking_uri: str | None = None, progress: bool = True,
                explain: ExplainConfig | None = None, pacs: PacsConfig | None = None, dicom_results: bool = False,
                dicom_out: Path | str | None = None, engine: str = "local", ray_address: str | None = None) -> dict:
    """Predict every study in `paths`; writes OUT/<study-id>.json (and a saliency NIfTI with `saliency`).

    A path ``dicomweb:<StudyInstanceUID>[/<SeriesInstanceUID>]`` is retrieved from `pacs.url` first.
    With `dicom_results`, a DICOM study also gets a TID 1500 SR, a Parametric Map and a burned-in SC:
    stored back into its study on the PACS for a dicomweb input, written to `dicom_out`/<study-id>/ for
    a local folder (those files are PACS-side: they carry the source's identity and UIDs; OUT does not).
    The map uses `explain` (method, layer, shifts, reflection, class) — by default the params' defaults, the
    same as the explain stage's — and explains the class the calibrated decision chose.
    `engine="ray"`: the studies are spread over the Ray cluster at `ray_address` (None: a private one on
    this machine), one worker per CPU, each loading the model once; the records equal the local run's.
    """
    import mlflow

    from pipeline.io.artifacts import save_json
    from pipeline.progress import task_bar

    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}", hint="use --engine local or --engine ray")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, version = resolve_model_version(model_uri)
    model_fields = {"uri": model_uri, "name": name, "version": version}
    job = PredictJob(out, modality, saliency, dicom_results, Path(dicom_out) if dicom_out else None,
                     explain or ExplainConfig(), pacs or PacsConfig(), model_fields,
                     model_identity(model_uri, name, version))
    items = [(job, i, p) for i, p in enumerate(paths)]
    records: list[dict] = []
    workers = 1
    if engine == "ray":
        from pipeline.ray_engine import ray_actor_map

        load = partial(_load_on_worker, model_uri, mlflow.get_tracking_uri(), mlflow.get_registry_uri())
        load_registered(model_uri)  # fails here, with its hint, when the model cannot be loaded at all
        records, workers = ray_actor_map(load, _predict_on_worker, items, ray_address, "predicting", progress)
        for rec in records:
            save_json(out / f"{rec['study_id']}.json", rec)
    else:
        _, impl = load_registered(model_uri)
        with task_bar("predicting", progress) as bar:
            task = bar.add_task("predict", total=len(paths))
            for item in items:
                rec = predict_path(impl, *item)
                save_json(out / f"{rec['study_id']}.json", rec)
                records.append(rec)
                bar.advance(task)
    n_ok = sum(r["status"] == "ok" for r in records)
    return {"model": model_fields, "out_dir": str(out), "n": len(records), "n_ok": n_ok,
            "n_rejected": len(records) - n_ok, "records": records,
            "engine": {"name": engine, "workers": workers}}


__all__ = ["run_predict", "predict_one", "study_id", "load_registered", "resolve_model_version", "label_results"]
