"""Deterministic demo cohort: real DICOM CT series and NIfTI MR volumes of one phantom family.

Every study samples the same kind of anatomy (a torso phantom defined in world RAS millimetres) on its own
voxel grid, so the files exercise what real readers must get right: DICOM slice sorting, LPS->RAS,
PixelSpacing order, rescale, RLE decoding, stray files and localizers; NIfTI permuted, flipped and oblique
affines, int16/float32 storage, arbitrary intensity scales. Label 1 means a lesion blob is present; its
binary mask is saved on the image's own grid for every study. With ``task: three_class`` label 1 is a
hyperdense/hyperintense lesion and label 2 a hypodense/hypointense one (`CLASS_NAMES`); with ``task:
two_findings`` (multi-label) a study has two independent findings, a hyperdense/hyperintense lesion (A)
and a hypodense/hypointense one (B), each present with probability ``lesion_fraction``: label "A;B"
(e.g. "1;0"), both lesions in one study when both are present, the mask their union. ``preset: hard``
swaps in small, faint lesions in noisier images (`PRESETS`).

This driver holds the cohort plan (patients, studies, labels, fake PHI) and writes the cohort, truth.json
and the manifest; the phantom and grids are pure in `pipeline.core.phantom` and the DICOM/NIfTI writers
are in `pipeline.io.synthetic_dicom`.

Everything derives from ``seed`` (numpy Generators, hash-derived UIDs, dates drawn from the generator), so
one seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import SynthesizeConfig
from pipeline.core.phantom import make_phantom
from pipeline.errors import ConfigError
from pipeline.io.artifacts import save_text
from pipeline.io.synthetic_dicom import (
    FIRST_NAMES_F,
    FIRST_NAMES_M,
    LAST_NAMES,
    CasePlan,
    PatientPHI,
    write_ct_study,
    write_mr_study,
)
from pipeline.progress import progress_map

# Files in out_dir that mark it as ours, so a stale cohort may be deleted but nothing else.
_MARKER = ".resdx-synthetic"

# The names of labels 0..K-1 per `synthesize.task`: what `data.class_names` should say for the cohort.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "binary": ("no lesion", "lesion"),
    "three_class": ("no lesion", "hyperdense", "hypodense"),
    "two_findings": ("hyperdense", "hypodense"),  # the labels of the multi-label vector, in order
}

# The difficulty knobs of SynthesizeConfig; a preset other than "default" REPLACES all of them with its
# row below (explicit values in params.yaml are then ignored).
DIFFICULTY_KEYS = ("lesion_radius_mm", "lesion_contrast_hu", "lesion_gain_mr", "ct_noise_hu", "mr_noise",
                   "mr_bias_field", "ct_drift_hu")
# default: the config as given (its shipped values make lesions so conspicuous, per-voxel lesion CNR
# >~10 on CT and MR, that every model scores a test AUROC of ~1.0).
# hard: aimed at a test AUROC of 0.80-0.95 for the default network. Lesions from invisible to obvious:
# 8-25 mm radius (1.6-5 voxels at 5 mm), CT 60-400 HU over 15-25 HU of noise plus a +-20 HU low-frequency
# drift, MR gain 0.3-3.0 over a Rician sigma of 0.03-0.05 and a +-40% bias field. The easy end lets the
# network find the lesions at all; the faint end keeps it from saturating. Measured (benchmarks/README.md,
# "science"): test AUROC 0.821 [0.707, 0.921], val AUROC 0.4-0.6 for 5 epochs, 0.86-0.91 from epoch 9.
# Two narrower tables (6-12 mm at 30-80 HU; 10-18 mm at 80-180 HU, MR gain 0.4-1.0) were not learnable
# from 187 training cases: val AUROC 0.39-0.59 over 8 and 15 epochs, test 0.48-0.53.
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "hard": {
        "lesion_radius_mm": (8.0, 25.0),
        "lesion_contrast_hu": (60.0, 400.0),
        "lesion_gain_mr": (0.3, 3.0),
        "ct_noise_hu": (15.0, 25.0),
        "mr_noise": (0.03, 0.05),
        "mr_bias_field": 0.4,
        "ct_drift_hu": 20.0,
    },
}


# --------------------------------------------------------------------------------------------------------
# Cohort plan
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisSummary:
    out_dir: Path
    manifest: Path
    n_patients: int
    n_studies: int
    n_ct: int
    n_mr: int
    n_positive: int
    n_compressed: int
    n_localizers: int
    n_files: int
    n_bytes: int
    class_names: tuple[str, ...] = CLASS_NAMES["binary"]
    label_counts: tuple[int, ...] = ()  # studies per label 0..K-1 (two_findings: with each finding)


def resolve_preset(cfg: SynthesizeConfig) -> SynthesizeConfig:
    """The config with its preset's difficulty values in place of its own (preset "default": `cfg` itself)."""
    update = PRESETS[cfg.preset]
    return cfg.model_copy(update=update) if update else cfg


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Independent, order-free streams per (seed, key): a case's pixels don't depend on other cases.
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=key))


def plan_cohort(cfg: SynthesizeConfig, seed: int) -> list[CasePlan]:
    """Patients, studies, modalities and labels; exact positive count = round(lesion_fraction * studies).

    three_class: the positives are split into label 1 (hyper) and 2 (hypo, negative contrast), hypo =
    half rounded down. Its extra draw comes last, so the binary cohort's draws are unchanged.
    two_findings: finding A (hyper) is the binary cohort's label; finding B (hypo) an independent
    permutation with the same exact count, drawn last with the second lesion's radius and contrast. The
    first lesion is A's where A is present (else B's, negative contrast); with both, B is a second lesion.
    """
    cfg = resolve_preset(cfg)
    lo, hi = cfg.studies_per_patient
    if not 1 <= lo <= hi:
        raise ConfigError(f"synthesize.studies_per_patient must satisfy 1 <= low <= high, "
                          f"got {cfg.studies_per_patient}")
    rng = _rng(seed, 0)
    width = max(3, len(str(cfg.n_patients)))
    rows: list[tuple[int, int, str, PatientPHI]] = []
    for p in range(cfg.n_patients):
        sex = str(rng.choice(["F", "M"]))
        first = str(rng.choice(FIRST_NAMES_F if sex == "F" else FIRST_NAMES_M))
        phi = PatientPHI(
            name=f"{rng.choice(LAST_NAMES)}^{first}",
            mrn=f"MRN{int(rng.integers(10**6, 10**7)):07d}",
            birth_date=dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365))),
            sex=sex,
        )
        for s in range(int(rng.integers(lo, hi + 1))):
            rows.append((p, s, "CT" if rng.random() < cfg.ct_fraction else "MR", phi))
    n = len(rows)
    labels = np.zeros(n, dtype=int)
    labels[: int(round(cfg.lesion_fraction * n))] = 1
    labels = rng.permutation(labels)
    radii = rng.uniform(*cfg.lesion_radius_mm, n)
    unit = rng.uniform(0.0, 1.0, n)  # contrast within each modality's configured range
    ct_idx = [i for i, r in enumerate(rows) if r[2] == "CT"]
    # Drawn whatever the fraction, so changing compressed_fraction leaves every pixel unchanged.
    order = rng.permutation(len(ct_idx))
    n_comp = int(round(cfg.compressed_fraction * len(ct_idx)))
    if cfg.compressed_fraction > 0 and ct_idx:
        n_comp = max(1, n_comp)
    compressed = {ct_idx[i] for i in order[:n_comp]}
    localizer = set(ct_idx[::7])  # every 7th CT study, starting with the first
    if cfg.task == "three_class":
        positive = np.flatnonzero(labels == 1)
        labels[rng.permutation(positive)[: len(positive) // 2]] = 2
    hypo = labels == 2  # the (first) lesion has negative contrast
    findings = np.zeros((n, 0), dtype=int)
    both = np.zeros(n, dtype=bool)  # a second lesion (finding B beside A)
    second_radii, second_unit = np.zeros(n), np.zeros(n)
    if cfg.task == "two_findings":
        b = np.zeros(n, dtype=int)
        b[: int(round(cfg.lesion_fraction * n))] = 1
        findings = np.stack([labels, rng.permutation(b)], axis=1)
        second_radii, second_unit = rng.uniform(*cfg.lesion_radius_mm, n), rng.uniform(0.0, 1.0, n)
        labels = findings.max(axis=1)  # any lesion
        hypo, both = findings[:, 0] == 0, findings.sum(axis=1) == 2
    sign = np.where(hypo, -1.0, 1.0)

    def contrast(mod: str, u: float) -> float:
        return float(np.interp(u, [0, 1], cfg.lesion_contrast_hu if mod == "CT" else cfg.lesion_gain_mr))

    return [
        CasePlan(
            index=i, case_id=f"demo-c{i + 1:04d}", patient_id=f"demo-p{p + 1:0{width}d}",
            patient_key=f"p{p + 1:0{width}d}", study_key=f"s{s + 1:02d}", modality=mod, label=int(labels[i]),
            lesion_radius=round(float(radii[i]), 2), compressed=i in compressed, localizer=i in localizer,
            lesion_contrast=float(sign[i] * contrast(mod, unit[i])),
            phi=phi, ct_noise_hu=cfg.ct_noise_hu, mr_noise=cfg.mr_noise, mr_bias_field=cfg.mr_bias_field,
            ct_drift_hu=cfg.ct_drift_hu, findings=tuple(int(v) for v in findings[i]),
            second_radius=round(float(second_radii[i]), 2) if both[i] else 0.0,
            second_contrast=-contrast(mod, second_unit[i]) if both[i] else 0.0,
        )
        for i, (p, s, mod, phi) in enumerate(rows)
    ]


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _write_case(plan: CasePlan, seed: int, out_dir: Path) -> dict:
    """Write one study into a hidden temp folder, then rename it into place."""
    rng = _rng(seed, 1, plan.index)
    ph = make_phantom(rng, plan.lesion_radius if plan.label else None,
                      second_radius=plan.second_radius if plan.second_radius else None)
    final = out_dir / plan.patient_key / plan.study_key
    tmp = final.with_name(f".{plan.study_key}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if plan.modality == "CT":
        geometry = write_ct_study(plan, ph, seed, rng, tmp)
        image = final / "dicom"
    else:
        geometry = write_mr_study(plan, ph, rng, tmp)
        image = final / "image.nii.gz"
    os.replace(tmp, final)
    return {
        "case_id": plan.case_id,
        "patient_id": plan.patient_id,
        "modality": plan.modality,
        "label": list(plan.findings) if plan.findings else plan.label,
        "lesion_centre_ras": [round(v, 4) for v in ph.lesion_centre] if ph.lesion_centre else None,
        "lesion_radius_mm": plan.lesion_radius if plan.label else None,
        "image": image.relative_to(out_dir).as_posix(),
        "mask": (final / "mask.nii.gz").relative_to(out_dir).as_posix(),
        **geometry,
        **({"second_lesion_centre_ras": [round(v, 4) for v in ph.second_centre]} if ph.second_centre else {}),
    }


def _clear_out_dir(out_dir: Path) -> None:
    """Delete a previous cohort; refuse to delete a non-empty folder we did not create."""
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / _MARKER).exists():
            raise FileExistsError(f"{out_dir} is not empty and holds no synthetic cohort; not deleting it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / _MARKER).write_text("Generated by pipeline.stages.synthesize; deleted on the next run.\n")


def _write_case_task(task: dict) -> dict:
    return _write_case(task["plan"], task["seed"], task["out_dir"])


def synthesize(cfg: SynthesizeConfig, seed: int, progress: bool = False) -> SynthesisSummary:
    """Write the demo cohort under cfg.out_dir, `truth.json` beside it and the manifest at cfg.manifest."""
    out_dir, manifest = Path(cfg.out_dir), Path(cfg.manifest)
    plans = plan_cohort(cfg, seed)
    _clear_out_dir(out_dir)
    # Every case draws from its own seeded generator, so parallel writing keeps the bytes identical.
    tasks = [{"plan": plan, "seed": seed, "out_dir": out_dir} for plan in plans]
    records = progress_map(_write_case_task, tasks, cfg.workers, "synthesizing", progress)
    # One case per line: greppable and diff-friendly. The task, preset and class names are written only
    # when not the defaults, so the default cohort's truth.json keeps its bytes.
    cases = ",\n".join("  " + json.dumps(rec) for rec in records)
    class_names = CLASS_NAMES[cfg.task]
    head: dict = {"seed": seed}
    if cfg.task != "binary" or cfg.preset != "default":
        head.update(task=cfg.task, preset=cfg.preset, class_names=list(class_names))
    save_text(out_dir / "truth.json", json.dumps(head)[:-1] + f',\n "cases": [\n{cases}\n ]}}\n')

    # Manifest paths are relative to the manifest's own folder, so the repository can move. Beyond two
    # classes a label_name column (ignored by the reader) names each label: see data.class_names.
    # two_findings: the label is the 0/1 vector joined by ';' ("1;0"), label_name the findings present.
    named = cfg.task != "binary"
    base = manifest.parent.resolve()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "patient_id", "modality", "path", "label", "mask_path"] + ["label_name"] * named)
    for rec in records:
        rel = [
            Path(os.path.relpath((out_dir / rec[k]).resolve(), base)).as_posix()
            for k in ("image", "mask")
        ]
        label, name = rec["label"], class_names[rec["label"]] if isinstance(rec["label"], int) else ""
        if isinstance(label, list):
            name = "+".join(n for n, v in zip(class_names, label) if v) or "none"
            label = ";".join(str(v) for v in label)  # the manifest reader's multi-label cell
        writer.writerow([rec["case_id"], rec["patient_id"], rec["modality"], rel[0], label, rel[1]]
                        + [name] * named)
    save_text(manifest, buf.getvalue())

    files = [p for p in out_dir.rglob("*") if p.is_file()]
    return SynthesisSummary(
        out_dir=out_dir, manifest=manifest, n_patients=cfg.n_patients, n_studies=len(plans),
        n_ct=sum(p.modality == "CT" for p in plans), n_mr=sum(p.modality == "MR" for p in plans),
        n_positive=sum(p.label > 0 for p in plans), n_compressed=sum(p.compressed for p in plans),
        n_localizers=sum(p.localizer for p in plans), n_files=len(files),
        n_bytes=sum(p.stat().st_size for p in files), class_names=class_names,
        label_counts=tuple(sum(p.findings[k] if p.findings else p.label == k for p in plans)
                           for k in range(len(class_names))),
    )
