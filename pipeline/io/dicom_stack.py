"""Turn DICOM frames into one geometry-checked volume, as dcm2niix does.

Frames are grouped into stacks (series, series number, echo, stack id, orientation,
matrix), one stack is chosen by a documented rule, its slices are sorted by their
position along the slice normal (never by InstanceNumber), and its geometry is checked:
duplicated positions, missing slices, non-uniform spacing, gantry tilt, too few slices.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.core.volume import Volume
from pipeline.errors import RejectedCase
from pipeline.io.dicom_pixels import assemble
from pipeline.io.dicom_scan import Frame

POSITION_TOL_MM = 0.01  # positions closer than this along the normal are the same slice
SPACING_REL_TOL = 0.02  # slice gaps within 2% of the median count as uniform (text rounding, jitter)
TILT_TOL_DEG = 0.05  # steps off the normal by more than this are a tilted (sheared) stack
ORIENT_TOL = 1e-3  # direction cosines closer than this are one orientation


@dataclass
class Stack:
    """Frames that share series, orientation and matrix: one 3D or 4D image."""

    frames: list[Frame]
    series_uid: str = ""  # used to honour the manifest's choice; never written out
    series_number: int = 0
    localizer: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def n_positions(self) -> int:
        return len(_cluster_positions(_projections(self.frames)))


def _normal(frame: Frame) -> np.ndarray:
    n = np.cross(frame.row_cos, frame.col_cos)
    return n / np.linalg.norm(n)


def _projections(frames: list[Frame]) -> np.ndarray:
    n = _normal(frames[0])
    return np.array([float(np.dot(f.ipp, n)) for f in frames])


def _cluster_positions(proj: np.ndarray) -> list[np.ndarray]:
    """Indices of frames grouped by position along the normal, in ascending order."""
    order = np.argsort(proj, kind="stable")
    groups: list[list[int]] = []
    last = None
    for idx in order:
        if last is None or proj[idx] - last > POSITION_TOL_MM:
            groups.append([])
        groups[-1].append(int(idx))
        last = proj[idx]
    return [np.array(g) for g in groups]


def group_stacks(frames: list[Frame]) -> list[Stack]:
    """Split frames into stacks; one SeriesInstanceUID may hold several (localizers, echoes)."""
    by_key: dict[tuple, list[Frame]] = defaultdict(list)
    for f in frames:
        by_key[f.stack_key].append(f)
    stacks = []
    for key, members in by_key.items():
        clusters: list[tuple[np.ndarray, list[Frame]]] = []
        for f in members:
            ori = np.concatenate([f.row_cos, f.col_cos])
            for ref, group in clusters:
                if np.max(np.abs(ref - ori)) < ORIENT_TOL:
                    group.append(f)
                    break
            else:
                clusters.append((ori, [f]))
        for _ori, group in clusters:
            stacks.append(Stack(frames=group, series_uid=key[0], series_number=group[0].series_number,
                                localizer=group[0].localizer))
    return stacks


def choose_stack(stacks: list[Stack], series_uid: str | None = None) -> Stack:
    """Pick the stack to convert.

    Rule: when the manifest names a SeriesInstanceUID, only its stacks qualify. Localizers
    (ImageType LOCALIZER) are skipped unless nothing else exists. Among the rest, the stack
    with the most slice positions wins, then the most frames, then the lowest series number.
    """
    pool = stacks
    if series_uid:
        pool = [s for s in stacks if s.series_uid == series_uid]
        if not pool:
            raise RejectedCase("series_not_found",
                               f"the manifest's series_uid matches none of the {len(stacks)} stacks found "
                               "(check the series_uid column, or leave it empty to pick automatically)")
    non_loc = [s for s in pool if not s.localizer]
    pool = non_loc or pool
    ranked = sorted(pool, key=lambda s: (-s.n_positions, -len(s.frames), s.series_number))
    chosen = ranked[0]
    others = [s for s in stacks if s is not chosen]
    if others:
        n_loc = sum(s.localizer for s in others)
        orientations = {tuple(np.round(np.concatenate([s.frames[0].row_cos, s.frames[0].col_cos]), 2))
                        for s in stacks}
        desc = f"chose 1 of {len(stacks)} stacks ({chosen.n_positions} slices)"
        if n_loc:
            desc += f"; skipped {n_loc} localizer stack(s)"
        if len(orientations) > 1:
            desc += f"; the input mixes {len(orientations)} orientations"
        chosen.notes.append(desc)
    return chosen


@dataclass
class StackGeometry:
    """Sorted layout of a stack: frame indices per position and per volume, and its affine."""

    order: np.ndarray  # (n_positions, n_volumes) indices into stack.frames
    affine_lps: np.ndarray
    slice_spacing: float
    tilt_deg: float


def analyse(stack: Stack, min_slices: int = 1) -> StackGeometry:
    """Sort slices along the normal and check the stack's geometry; raise RejectedCase if unusable."""
    frames = stack.frames
    proj = _projections(frames)
    groups = _cluster_positions(proj)
    n_pos = len(groups)
    counts = {len(g) for g in groups}
    mixed = " (the input also mixes orientations)" if any("orientations" in n for n in stack.notes) else ""
    if n_pos == 1 and len(frames) > 1 and frames[0].layout != "mosaic":
        raise RejectedCase("duplicate_positions",
                           f"all {len(frames)} images share one slice position: duplicates, not a volume")
    if len(counts) > 1:
        raise RejectedCase("duplicate_positions",
                           f"slice positions repeat unevenly ({n_pos} positions hold {min(counts)}-{max(counts)} "
                           "images each): duplicated or missing images")
    n_vol = counts.pop()
    order = np.empty((n_pos, n_vol), dtype=np.int64)
    for p, g in enumerate(groups):
        keys = [frames[i].volume_key for i in g]
        if n_vol > 1 and len({k[:-1] for k in keys}) < n_vol:
            raise RejectedCase("duplicate_positions",
                               f"{n_vol} images at one slice position carry the same time/acquisition index: "
                               "duplicated slices")
        order[p] = g[sorted(range(len(g)), key=lambda i, keys=keys: _sortable(keys[i]))]
    if n_pos < min_slices:
        raise RejectedCase("too_few_slices", f"{n_pos} slice(s), fewer than the {min_slices} required{mixed}")

    first = frames[order[0, 0]]
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) > 1:
        raise RejectedCase("varying_pixel_spacing", "PixelSpacing differs between slices of one stack")
    row_sp, col_sp = first.pixel_spacing
    normal = _normal(first)
    pos = np.array([frames[order[p, 0]].ipp for p in range(n_pos)])
    tilt = 0.0
    if n_pos > 1:
        gaps = np.diff(proj[order[:, 0]])
        med = float(np.median(gaps))
        if med <= POSITION_TOL_MM:
            raise RejectedCase("duplicate_positions", "slice positions do not advance along the normal")
        big = gaps > med * 1.5
        if np.any(big) and n_pos > 2:
            worst = float(gaps.max())
            raise RejectedCase("missing_slice",
                               f"gap of {worst:.2f} mm where slices are {med:.2f} mm apart "
                               f"(about {round(worst / med) - 1} slice(s) missing)")
        if np.max(np.abs(gaps - med)) > max(POSITION_TOL_MM, SPACING_REL_TOL * med):
            raise RejectedCase("nonuniform_spacing",
                               f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm "
                               "(variable-pitch series are not resampled; export equidistant slices)")
        step = (pos[-1] - pos[0]) / (n_pos - 1)
        off_line = pos - (pos[0] + np.outer(np.arange(n_pos), step))
        if np.max(np.linalg.norm(off_line, axis=1)) > max(0.1, 0.05 * med):
            raise RejectedCase("noncollinear_slices", "slice positions do not lie on one line")
        cos = abs(float(np.dot(step, normal))) / float(np.linalg.norm(step))
        tilt = float(np.degrees(np.arccos(min(1.0, cos))))
        if tilt <= TILT_TOL_DEG:
            step = normal * float(np.dot(step, normal))  # exact normal direction, no numerical shear
            tilt = 0.0
        spacing = float(abs(np.dot(step, normal)))
    else:
        spacing = float(first.slice_thickness or 1.0)
        step = normal * spacing
    affine = np.eye(4)
    affine[:3, 0] = first.row_cos * col_sp
    affine[:3, 1] = first.col_cos * row_sp
    affine[:3, 2] = step
    affine[:3, 3] = pos[0]
    return StackGeometry(order=order, affine_lps=affine, slice_spacing=spacing, tilt_deg=tilt)


def _sortable(key: tuple) -> tuple:
    # Mixed types (numbers, tuples, file names) compare within their own position only.
    return tuple((0, k) if isinstance(k, (int, float)) else (1, str(k)) for k in key)


def stack_to_volume(stack: Stack, min_slices: int = 1, take_volume: int | None = None,
                    max_bytes: int = DEFAULT_MAX_CASE_BYTES, integers: bool = False) -> Volume:
    geometry = analyse(stack, min_slices=min_slices)
    data, affine = assemble(stack, geometry, take_volume, max_bytes, integers=integers)
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in stack.frames)
    meta = {
        "integer_valued": integral,  # stored integers x integral slope + intercept: exact in int16/int32
        "n_frames": len(stack.frames),
        "layout": stack.frames[0].layout,
        "slice_spacing_mm": round(geometry.slice_spacing, 4),
        "gantry_tilt_deg": round(geometry.tilt_deg, 3),
        "notes": list(stack.notes),
    }
    if geometry.tilt_deg:
        meta["notes"].append(f"tilted/sheared stack ({geometry.tilt_deg:.2f} deg): kept exact in the affine")
    return Volume(data=data, affine=affine, meta=meta)
