"""Standard DICOM result objects for the PACS side: a TID 1500 SR of the decisions and a Parametric Map of saliency.

Unlike the research-side overlay (`dicom_overlay.write_overlay_series`), these objects belong to the
source study: the real StudyInstanceUID, the patient module copied from the source headers (by highdicom)
and references to every source instance, so a PACS files them next to the series they describe.
The source datasets come in the reader's slice order (`read_dicom_series`: k ascending along the
slice normal), so saliency[:, :, k] on the reader's grid is DICOM frame k, transposed to rows x columns.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.errors import RejectedCase
from pipeline.io.artifacts import atomic_write
from pipeline.io.dicom_scan import scan
from pipeline.io.dicom_stack import analyse, choose_stack, group_stacks

MANUFACTURER = "ResDx"
SR_SERIES_NUMBER = 9002  # 9001 is the burned-in overlay (dicom_overlay)
PMAP_SERIES_NUMBER = 9003
# Our own concepts (label findings, the referral) live in a private coding scheme: the standard has no
# code for "this model's label" or "a human read was requested". 99 prefixes are reserved for local schemes.
SCHEME = "99RESDX"
HUMAN_READ = hd.sr.CodedConcept(value="HUMANREAD", scheme_designator=SCHEME, meaning="Human read requested")
# Type 2 attributes highdicom reads from the first source as plain attributes (AttributeError when absent).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
_PIXEL_GROUP = 0x7FE0


def software_version() -> str:
    """The installed ResDx package version, "0+unknown" when it is not installed (a plain checkout)."""
    try:
        return importlib.metadata.version("resdx")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced a result, as the registry names it."""

    uri: str  # e.g. "models:/resdx@champion"
    name: str | None  # registered model name
    version: str | None  # registered model version
    alias: str | None  # "champion" when the uri used an alias
    software_version: str  # ResDx package version, see `software_version()`


@dataclass(frozen=True)
class LabelResult:
    """One label's outcome for one case."""

    name: str  # class/label name, e.g. "lesion" (at most 64 characters: a DICOM code meaning)
    probability: float  # calibrated probability in [0, 1]
    present: bool  # the decision
    threshold: float | None  # decision threshold on the probability (binary / per label), None for argmax
    rule: str  # human-readable decision rule text
    referred: bool  # the model asks for a human read (uncertain)


# ----------------------------------------------------------------------------- sources
def source_instances(path: Path | str, series_uid: str | None = None,
                     max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> list[Dataset]:
    """Headers of the series `read_dicom_series(path, series_uid)` reads, in its k order (ascending along the normal).

    Same stack choice as the reader (scan, group_stacks, choose_stack, analyse). Each item is a new Dataset with
    the header elements (values over 4 KB, such as PixelData, left out) and absent type 2 patient/study
    attributes set empty, so highdicom can copy them. Raises `RejectedCase` as the reader does, and
    `ValueError` for a multi-frame, mosaic or multi-volume (4D) series, which these writers do not support.
    """
    found = scan(Path(path), max_bytes)
    stack = choose_stack(group_stacks(found.frames), series_uid=series_uid)
    lost = [err for uid, number, err in found.broken if uid == stack.series_uid and number == stack.series_number]
    if lost:  # the reader rejects this case: results must not describe a series it could not read
        raise RejectedCase(lost[0].code, f"{len(lost)} file(s) of the chosen series: {lost[0].reason}")
    layout = stack.frames[0].layout
    if layout != "single":
        raise ValueError(f"the chosen series is stored as {layout} images: DICOM results are written only for "
                         "single-frame series (one file per slice)")
    geometry = analyse(stack)
    if geometry.order.shape[1] > 1:
        raise ValueError(f"the chosen series holds {geometry.order.shape[1]} volumes (4D): DICOM results are "
                         "written only for 3D series")
    return [_header(stack.frames[i].dataset) for i in geometry.order[:, 0]]


def _header(ds: Dataset) -> Dataset:
    """A copy of `ds` without pixel data or other deferred (large) values, type 2 patient/study attributes present."""
    out = Dataset()
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if tag.group == _PIXEL_GROUP or (isinstance(elem, RawDataElement) and elem.value is None and elem.length):
            continue  # a deferred value: reading it would load pixel data we do not need
        out[tag] = ds[tag]
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


# ----------------------------------------------------------------------------- structured report
def _label_code(name: str) -> hd.sr.CodedConcept:
    if not name or len(name) > 64:
        raise ValueError(f"label name {name!r} must be 1-64 characters (it is the finding's DICOM code meaning)")
    value = re.sub(r"[^A-Z0-9]", "_", name.upper())[:16]  # CodeValue is a 16-character SH
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=name)


def _device_uid(model: ModelIdentity) -> str:
    # One UID per model identity and software: the same model version reports as the same device.
    return generate_uid(entropy_srcs=["ResDx device", model.uri, model.name or "", model.version or "",
                                      model.software_version])


def _procedure(modality: str) -> Code:
    return {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion,
            "PT": codes.LN.PETUnspecifiedBodyRegion, "NM": codes.LN.NMUnspecifiedBodyRegion,
            }.get(modality, codes.SCT.ImagingProcedure)


def _group(result: LabelResult, model: ModelIdentity,
           sources: Sequence[Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one label: finding, probability (and threshold), present/absent, human read yes/no."""
    if not 0.0 <= float(result.probability) <= 1.0:  # also False for NaN
        raise ValueError(f"probability of {result.name!r} is {result.probability}, not in [0, 1]")
    threshold = "none (argmax over classes)" if result.threshold is None else repr(float(result.threshold))
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name or MANUFACTURER, version=model.version or "unversioned", manufacturer=MANUFACTURER,
        parameters=[f"model_uri={model.uri}", f"alias={model.alias or ''}", f"threshold={threshold}",
                    f"rule={result.rule}", f"resdx={model.software_version}"])
    measurements = [hd.sr.Measurement(name=codes.DCM.Probability, value=float(result.probability),
                                      unit=codes.UCUM.NoUnits, algorithm_id=algorithm)]
    if result.threshold is not None:
        measurements.append(hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(result.threshold),
                                              unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=codes.DCM.PresenceOfProperty,
                                    value=codes.SCT.Present if result.present else codes.SCT.Absent),
        hd.sr.QualitativeEvaluation(name=HUMAN_READ, value=codes.SCT.Yes if result.referred else codes.SCT.No),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"ResDx {result.name}"),
        finding_type=_label_code(result.name), algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources])


def build_sr(sources: Sequence[Dataset], results: Sequence[LabelResult], model: ModelIdentity,
             series_number: int = SR_SERIES_NUMBER) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR (TID 1500 Measurement Report) of `results` on the series `sources`.

    `sources`: the series' headers (`source_instances`), all of one study. One measurement group per label,
    each referencing every source image; the probability and threshold are unitless (UCUM "1") and exact
    (FloatingPointValue). The observer is the device "ResDx" with the registered model name. Same study and
    patient as the sources, a new series and instance. Raises ValueError without sources or results.
    """
    if not sources or not results:
        raise ValueError("an SR needs at least one source image and one label result")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(model), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
        model_name=model.name or MANUFACTURER, serial_number=model.version or None)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=_procedure(str(sources[0].get("Modality", ""))),
        imaging_measurements=[_group(r, model, sources) for r in results])
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources), content=report[0], series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="ResDx AI result (not verified by a physician)",
        manufacturer_model_name=model.name or MANUFACTURER, software_versions=model.software_version)
    # A local coding scheme is declared in the SOP Common module, so a reader can tell whose codes they are.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "ResDx local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _items(container: Dataset, value: str, scheme: str) -> list[Dataset]:
    return [item for item in container.get("ContentSequence", [])
            if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == value
            and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == scheme]


def read_sr_probabilities(ds: Dataset) -> dict[str, float]:
    """{label name: probability} from an SR written by `build_sr` (or any TID 1500 with the same concepts).

    Walks root -> Imaging Measurements -> each Measurement Group: the Finding's code meaning is the label,
    the Probability NUM item the value (FloatingPointValue when present, else the decimal string).
    """
    out: dict[str, float] = {}
    for measurements in _items(ds, "126010", "DCM"):  # Imaging Measurements
        for group in _items(measurements, "125007", "DCM"):  # Measurement Group
            finding = _items(group, "121071", "DCM")  # Finding
            prob = _items(group, codes.DCM.Probability.value, "DCM")
            if not finding or not prob:
                continue
            value = prob[0].MeasuredValueSequence[0]
            number = value.get("FloatingPointValue", None)
            out[str(finding[0].ConceptCodeSequence[0].CodeMeaning)] = float(
                number if number is not None else value.NumericValue)
    return out


# ----------------------------------------------------------------------------- parametric map
def _slice_spacing(sources: Sequence[Dataset]) -> float:
    """Distance (mm) between neighbouring slice positions along the normal; SliceThickness for one slice."""
    iop = np.asarray([float(v) for v in sources[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    proj = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in sources]
    if len(proj) > 1:
        return float(np.median(np.abs(np.diff(proj))))
    return float(sources[0].get("SliceThickness") or 1.0)


def build_parametric_map(sources: Sequence[Dataset], saliency: np.ndarray, model: ModelIdentity, explained: str,
                         series_number: int = PMAP_SERIES_NUMBER) -> hd.pm.ParametricMap:
    """A float32 Parametric Map of `saliency` on the frame of reference of `sources`.

    `sources`: the series' headers in the reader's k order (`source_instances`). `saliency`: (i, j, k) on the
    reader's native grid, shape (Columns, Rows, len(sources)), values in [0, 1] (unitless; clipped to it, so float
    rounding never leaves the declared real-world value range). The frame of slice k
    is saliency[:, :, k].T (rows x columns) at source k's ImagePositionPatient, with its orientation and pixel
    spacing. `explained`: the class the map explains (text). Raises ValueError on a shape mismatch.
    highdicom stores the frames sorted along its own slice normal (column x row, the reverse of the reader's
    k), each with its own PlanePositionSequence: read them back by position (`read_parametric_map`).
    """
    if not sources:
        raise ValueError("a parametric map needs at least one source image")
    first = sources[0]
    want = (int(first.Columns), int(first.Rows), len(sources))
    if saliency.ndim != 3 or tuple(saliency.shape) != want:
        raise ValueError(f"saliency has shape {tuple(saliency.shape)}, the source series needs {want} "
                         "(Columns, Rows, slices) on the reader's native grid")
    if not np.isfinite(saliency).all():
        raise ValueError("saliency holds NaN or infinite values")
    if "FrameOfReferenceUID" not in first:
        raise ValueError("the source series has no FrameOfReferenceUID: a parametric map cannot be placed on it")
    frames = np.ascontiguousarray(np.transpose(np.clip(saliency, 0.0, 1.0).astype(np.float32), (2, 1, 0)))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY", lut_explanation=f"Grad-CAM saliency of {explained}"[:64], unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0), slope=1, intercept=0)
    spacing = _slice_spacing(sources)
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in first.PixelSpacing],
        slice_thickness=float(first.get("SliceThickness") or spacing), spacing_between_slices=spacing)
    pmap = hd.pm.ParametricMap(
        source_images=list(sources), pixel_array=frames, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name or MANUFACTURER, software_versions=model.software_version,
        device_serial_number=model.version or "unversioned", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="SALIENCY", content_description=f"Grad-CAM saliency of {explained}"[:64],
        pixel_measures=measures,
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", [float(v) for v in first.ImageOrientationPatient]),
        plane_positions=[hd.PlanePositionSequence("PATIENT", [float(v) for v in ds.ImagePositionPatient])
                         for ds in sources],
        series_description=f"ResDx saliency: {explained}"[:64])
    # General Series Laterality (type 2C) is not copied by highdicom; empty states "unknown" when the source
    # does not say (dciodvfy reports a missing one as an error, an empty one as a warning).
    pmap.Laterality = first.get("Laterality", "") or ""
    return pmap


def read_parametric_map(ds: Dataset, sources: Sequence[Dataset]) -> np.ndarray:
    """The float32 values of a single-channel Parametric Map as (i, j, k) on the grid of `sources`.

    Frames are matched to source slices by position along the normal (within 0.01 mm), not by frame order,
    so the result is in the reader's k order whatever order the writer chose. Raises ValueError when a
    frame lies on no source slice or a slice has no frame.
    """
    iop = np.asarray([float(v) for v in sources[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    where = np.array([float(np.dot([float(v) for v in s.ImagePositionPatient], normal)) for s in sources])
    pixels = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    out = np.full((int(ds.Columns), int(ds.Rows), len(sources)), np.nan, dtype=np.float32)
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        at = float(np.dot([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], normal))
        k = int(np.argmin(np.abs(where - at)))
        if abs(where[k] - at) > 0.01:
            raise ValueError(f"frame {f + 1} of the parametric map lies on none of the source slices")
        out[:, :, k] = pixels[f].T
    if np.isnan(out).any():
        raise ValueError("the parametric map has no frame for some source slices")
    return out


# ----------------------------------------------------------------------------- files
_FILE_NAMES = {hd.sr.Comprehensive3DSR: "sr.dcm", hd.pm.ParametricMap: "pmap.dcm"}


def write_results(folder: Path | str, *objects: Dataset) -> list[Path]:
    """Save each object under `folder` as sr.dcm (an SR) or pmap.dcm (a Parametric Map), atomically; the paths."""
    folder = Path(folder)
    paths = []
    for obj in objects:
        name = next((n for cls, n in _FILE_NAMES.items() if isinstance(obj, cls)), None)
        if name is None:
            raise ValueError(f"no file name for a {type(obj).__name__}: expected an SR or a Parametric Map")
        paths.append(atomic_write(folder / name, lambda tmp, obj=obj: obj.save_as(tmp, enforce_file_format=True)))
    return paths


def result_objects(folder: Path | str, results: Sequence[LabelResult], model: ModelIdentity,
                   saliency: np.ndarray | None, explained: str, series_uid: str | None = None,
                   max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> dict[str, list[Dataset]]:
    """Everything the PACS gets for one study: {"sr": [SR], "parametric_map": [PM], "secondary_capture": [SC...]}.

    `folder`: the source series as the reader read it; `saliency` on its native grid (None, or a 2D
    model's map: the SR only). The SC images are the burned-in fallback for viewers without PM support.
    """
    from pipeline.io.dicom_overlay import build_overlay_for_pacs

    sources = source_instances(folder, series_uid, max_bytes)
    out: dict[str, list[Dataset]] = {"sr": [build_sr(sources, results, model)], "parametric_map": [],
                                     "secondary_capture": []}
    if saliency is not None and saliency.ndim == 3:
        out["parametric_map"] = [build_parametric_map(sources, saliency, model, explained)]
        out["secondary_capture"] = build_overlay_for_pacs(sources, folder, saliency)
    return out
