"""Pure preprocessing functions: orientation, resampling, crop/pad, intensity.

Every function returns the new voxel-to-RAS affine with the data, so the final tensor
knows exactly where each voxel sits in the scanner: that is what lets saliency maps go
back to the native grid (`affine_between`).

Canonical orientation: RAS+, the NIfTI/nibabel convention: increasing i moves towards the
patient's right, j towards anterior, k towards superior (closest axes; see `to_canonical`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES, require_fits
from pipeline.core.volume import Volume

if TYPE_CHECKING:
    from pipeline.core.plan import Plan, PlanGeometry

SHEAR_TOL = 1e-3  # |cos| between affine axes above this means a sheared (tilted) grid


def _directions(affine: np.ndarray) -> np.ndarray:
    a = affine[:3, :3]
    return a / np.linalg.norm(a, axis=0)


def is_sheared(affine: np.ndarray) -> bool:
    d = _directions(affine)
    gram = d.T @ d
    return bool(np.max(np.abs(gram - np.eye(3))) > SHEAR_TOL)


def deshear(data: np.ndarray, affine: np.ndarray, fill: float,
            max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Resample a sheared grid (gantry tilt) onto an orthogonal one covering the same region.

    The in-plane axes are kept; the slice axis becomes the true normal, with the slice
    spacing measured along it. This is dcm2niix's tilt correction, done with scipy.
    """
    d = _directions(affine)
    normal = np.cross(d[:, 0], d[:, 1])
    normal *= np.sign(np.dot(normal, affine[:3, 2]))
    out_aff = np.eye(4)
    out_aff[:3, 0], out_aff[:3, 1] = affine[:3, 0], affine[:3, 1]
    out_aff[:3, 2] = normal * float(np.dot(normal, affine[:3, 2]))
    # Bounding box of the input corners in the output grid.
    corners = np.array([[i, j, k, 1.0] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                        for k in (0, data.shape[2] - 1)])
    in_out = (np.linalg.inv(out_aff) @ affine @ corners.T)[:3]
    lo, hi = np.floor(in_out.min(axis=1)), np.ceil(in_out.max(axis=1))
    out_aff = out_aff @ _translate(lo)
    shape = tuple(int(b - a) + 1 for a, b in zip(lo, hi))
    require_fits(shape, 4, max_bytes, "the de-sheared (tilt-corrected) grid")
    mapping = np.linalg.inv(affine) @ out_aff  # output voxel -> input voxel
    out = ndimage.affine_transform(data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape,
                                   order=1, mode="constant", cval=fill, output=np.float32)
    return out, out_aff


def _translate(offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip voxel axes so that i, j, k point to +R, +A, +S (closest axes, as nibabel).

    Exact (no interpolation). Oblique acquisitions stay oblique in the affine, as in nnU-Net.
    """
    ornt = nio.io_orientation(affine)
    out = nio.apply_orientation(data, ornt)
    new_aff = affine @ nio.inv_ornt_aff(ornt, data.shape[:3])
    # A view (flips and transposes), not a copy: a second full-size volume would double the peak. int16
    # stays int16 (the same values; every later step computes in float), other types become float32.
    return out if out.dtype == np.int16 else out.astype(np.float32, copy=False), new_aff


def target_shape(shape, spacing, target_spacing) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


# Bump when the tensors preprocessing writes change for the same plan: ingest keys reused tensors on it.
PREPROCESS_VERSION = "2"
SPLINE_PAD = 12  # scipy's own padding before a spline prefilter with mode "nearest"


# Up to this size a pass's spline prefilter runs in float64, as scipy's zoom does (every demo volume); above
# it, float32: half the memory traffic, 2.4x faster on a 384x384x150 CT, within 1e-5 of float64.
EXACT_PREFILTER_BYTES = 16 << 20


def _cubic_weights(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cubic B-spline weights of the taps at floor(x) - 1 ... floor(x) + 2, for t = x - floor(x)."""
    t2, t3 = t * t, t * t * t
    return ((1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6)


SPLINE_CHUNK_BYTES = 64 << 20  # the padded working copy of one pass is made this much at a time


def spline_axis(data: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Cubic-spline values of `data` at `coords` (index units) along `axis`, as scipy's `map_coordinates(...,
    order=3, mode="nearest")` gives them along one axis: edge padding, scipy's own prefilter, 4 taps.

    float64 while the padded copy stays under `EXACT_PREFILTER_BYTES` (as scipy), else float32. Every line
    along `axis` is filtered on its own, so the volume is done in slabs across another axis, each padded
    copy at most `SPLINE_CHUNK_BYTES` (the same values: a large CT's pass no longer needs a padded copy of it).
    """
    n = data.shape[axis]
    coords = np.clip(np.asarray(coords, dtype=np.float64), -SPLINE_PAD + 2, n - 1 + SPLINE_PAD - 3)
    dtype = np.float64 if 8 * (data.size // max(n, 1)) * (n + 2 * SPLINE_PAD) <= EXACT_PREFILTER_BYTES else np.float32
    x = coords + SPLINE_PAD
    first = np.floor(x).astype(np.intp) - 1
    weights = [w.astype(dtype).reshape((len(x),) + (1,) * (data.ndim - 1)) for w in _cubic_weights(x - np.floor(x))]
    out = np.empty([len(x) if a == axis else k for a, k in enumerate(data.shape)], dtype=dtype)
    across = max((a for a in range(data.ndim) if a != axis), key=lambda a: data.shape[a])
    per_slab = np.dtype(dtype).itemsize * (n + 2 * SPLINE_PAD) * data.size // max(n * data.shape[across], 1)
    step = max(1, SPLINE_CHUNK_BYTES // max(per_slab, 1))
    for lo in range(0, data.shape[across], step):
        part = tuple(slice(lo, lo + step) if a == across else slice(None) for a in range(data.ndim))
        padded = np.moveaxis(edge_pad_axis(data[part], axis, SPLINE_PAD, dtype), axis, 0)
        ndimage.spline_filter1d(padded, order=3, axis=0, mode="nearest", output=padded)
        acc = np.zeros((len(x), *padded.shape[1:]), dtype=dtype)
        tmp = np.empty_like(acc)
        for tap, w in enumerate(weights):
            np.take(padded, first + tap, axis=0, out=tmp)
            np.multiply(w, tmp, out=tmp)
            acc += tmp
        out[part] = np.moveaxis(acc, 0, axis)
    return out


def edge_pad_axis(data: np.ndarray, axis: int, pad: int, dtype) -> np.ndarray:
    """`data` as `dtype` with `pad` copies of its first and last slab along `axis` (np.pad mode "edge")."""
    n = data.shape[axis]
    out = np.empty([k + 2 * pad if a == axis else k for a, k in enumerate(data.shape)], dtype=dtype)

    def at(sl):
        return tuple(sl if a == axis else slice(None) for a in range(data.ndim))
    out[at(slice(pad, pad + n))] = data
    out[at(slice(0, pad))] = out[at(slice(pad, pad + 1))]
    out[at(slice(pad + n, None))] = out[at(slice(pad + n - 1, pad + n))]
    return out


def zoom(data: np.ndarray, new_shape, order: int) -> np.ndarray:
    """`scipy.ndimage.zoom(data, ..., mode="nearest", grid_mode=True)` to `new_shape`, one axis at a time.

    A cubic B-spline on a grid is separable, so scipy's 3D zoom (a prefilter along every axis, then 4^3
    taps per output voxel from a 3D coordinate array) equals, up to float rounding (tested), a prefilter and
    4 taps along each axis in turn: about 10x less work, and the volume shrinks after each pass (the axis that
    shrinks most goes first). The padding and prefilter are scipy's own (`spline_filter1d`, mode "nearest");
    an axis whose size stays is left as it is (the spline passes through its samples).
    """
    new_shape = tuple(int(n) for n in new_shape)
    if order <= 1:
        return ndimage.zoom(data, np.array(new_shape) / np.array(data.shape[:3]), order=order, mode="nearest",
                            grid_mode=True).astype(np.float32, copy=False)
    if order != 3:
        raise ValueError(f"zoom: order {order} is not one of 0, 1, 3")
    out = data
    for axis in sorted(range(3), key=lambda a: (new_shape[a] / data.shape[a], a)):
        n, m = out.shape[axis], new_shape[axis]
        if m != n:  # zoom's grid mode: voxel corners aligned
            out = spline_axis(out, axis, (np.arange(m) + 0.5) * (n / m) - 0.5)
    return out.astype(np.float32, copy=False)


def resample(data: np.ndarray, affine: np.ndarray, new_shape, anisotropy_threshold: float = 3.0,
             max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> tuple[np.ndarray, np.ndarray, dict]:
    """Resample to `new_shape` over the same field of view (voxel corners aligned).

    nnU-Net's rule: cubic spline in general, but when the source is anisotropic (largest
    spacing / smallest > threshold) the coarse axis is interpolated with nearest neighbour
    (order 0), so that thick slices are not smeared into each other.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    factors = np.array(new_shape) / np.array(data.shape[:3])
    info = {"order": 3, "coarse_axis": None}
    if np.allclose(factors, 1.0):
        return data.astype(np.float32, copy=False), affine, info
    require_fits(new_shape, 4, max_bytes, "the resampled grid (check the voxel spacing in the header)")
    require_fits([n + 2 * SPLINE_PAD for n in data.shape[:3]], 4, max_bytes, "the resampling's working copy")
    aniso = spacing.max() / spacing.min() > anisotropy_threshold
    if aniso:
        axis = int(np.argmax(spacing))
        info = {"order": 3, "coarse_axis": axis, "coarse_order": 0}
        in_plane = np.array(new_shape)
        in_plane[axis] = data.shape[axis]
        require_fits(in_plane, 4, max_bytes, "the in-plane resampled grid")
        out = zoom(zoom(data, in_plane, order=3), new_shape, order=0)
    else:
        out = zoom(data, new_shape, order=3)
    scale = np.array(data.shape[:3]) / np.array(out.shape[:3])
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0  # centre of new voxel 0 in old voxel coordinates
    return out.astype(np.float32), affine @ step, info


def crop_or_pad(data: np.ndarray, affine: np.ndarray, shape, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop or pad each axis to `shape`; the affine follows the shift."""
    out = np.full(shape, fill, dtype=np.float32)
    start_src, start_dst, size = [], [], []
    for n_in, n_out in zip(data.shape[:3], shape):
        if n_in >= n_out:
            s = (n_in - n_out) // 2
            start_src.append(s)
            start_dst.append(0)
            size.append(n_out)
        else:
            d = (n_out - n_in) // 2
            start_src.append(0)
            start_dst.append(d)
            size.append(n_in)
    src = tuple(slice(a, a + n) for a, n in zip(start_src, size))
    dst = tuple(slice(a, a + n) for a, n in zip(start_dst, size))
    out[dst] = data[src]
    offset = np.array(start_src, dtype=float) - np.array(start_dst, dtype=float)
    return out, affine @ _translate(offset)


def ct_normalize(data: np.ndarray, window, mean: float, std: float) -> np.ndarray:
    """Clip HU to the plan's window, then the plan's global z-score (nnU-Net's CT scheme)."""
    out = np.clip(data, window[0], window[1])
    return ((out - mean) / max(std, 1e-6)).astype(np.float32)


def mr_normalize(data: np.ndarray, clip_percentiles) -> tuple[np.ndarray, dict]:
    """Per-image z-score, after optional percentile clipping (MR has no absolute scale)."""
    out = data.astype(np.float32)
    stats: dict = {}
    if clip_percentiles is not None:
        lo, hi = np.percentile(out, clip_percentiles)
        out = np.clip(out, lo, hi)
        stats["clip"] = [float(lo), float(hi)]
    mean, std = float(out.mean()), float(out.std())
    stats.update(mean=mean, std=std)
    return ((out - mean) / max(std, 1e-6)).astype(np.float32), stats


def affine_between(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """Voxel-to-voxel map from a grid with `dst_affine` into one with `src_affine`."""
    return np.linalg.inv(src_affine) @ dst_affine


def resample_to_grid(data: np.ndarray, affine: np.ndarray, out_shape, out_affine: np.ndarray,
                     order: int = 1, fill: float = 0.0) -> np.ndarray:
    """Resample `data` (on `affine`) onto another grid: used to take maps back to native space."""
    mapping = affine_between(affine, out_affine)
    return ndimage.affine_transform(data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(out_shape),
                                    order=order, mode="constant", cval=fill).astype(np.float32)


def volume_to_canonical(volume: Volume, fill: float,
                        max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Native volume -> RAS-canonical array, de-shearing tilted stacks first."""
    data, affine = volume.data, volume.affine
    if is_sheared(affine):
        data, affine = deshear(data, affine, fill, max_bytes)
    return to_canonical(data, affine)


# ----------------------------------------------------------------------------- the one path to a model tensor
CT_AIR_HU = -1024.0


def canonical_fill(modality: str, data: np.ndarray) -> float:
    """Value for voxels outside the scan: air for CT, the image minimum for MR."""
    return CT_AIR_HU if modality == "CT" else float(data.min())


def canonicalize(volume: Volume, modality: str,
                 max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 (cached by ingest): native volume -> RAS-canonical array and affine."""
    return volume_to_canonical(volume, fill=canonical_fill(modality, volume.data), max_bytes=max_bytes)


def plan_resample(data: np.ndarray, affine: np.ndarray,
                  plan: Plan | PlanGeometry) -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 2a: resample one RAS-canonical volume onto the plan's grid (its spacing, or its shape with
    `fit: resize`). Needs only the plan's geometry, so ingest can run it before the plan's intensities are
    fitted."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = tuple(plan.shape)
    new_shape = shape if plan.fit == "resize" else target_shape(data.shape, spacing, plan.target_spacing)
    return resample(data, affine, new_shape, plan.anisotropy_threshold, plan.reader.max_case_bytes)


def plan_normalize(out: np.ndarray, affine: np.ndarray, modality: str, plan: Plan,
                   rinfo: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 2b: normalize a resampled volume (CT window and z-score, or per-image MR z-score), then crop or
    pad it to the plan's shape."""
    shape = tuple(plan.shape)
    stats: dict = {"resampling": rinfo}
    if modality == "CT":
        ct = plan.ct
        out = ct_normalize(out, ct.window, ct.mean, ct.std)
        fill = float(ct_normalize(np.array([CT_AIR_HU]), ct.window, ct.mean, ct.std)[0])
    else:
        out, mstats = mr_normalize(out, plan.mr.clip_percentiles if plan.mr else None)
        stats["mr"] = mstats
        fill = float(out.min())
    if out.shape != shape:
        out, affine = crop_or_pad(out, affine, shape, fill)
    return out, affine, stats


def apply_plan(data: np.ndarray, affine: np.ndarray, modality: str, plan: Plan) -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 2: resample, normalize, crop/pad (or resize) one RAS-canonical volume with a plan."""
    out, aff, rinfo = plan_resample(data, affine, plan)
    return plan_normalize(out, aff, modality, plan, rinfo)


def to_slices(volume: np.ndarray, mode: str, n: int) -> tuple[np.ndarray, list[int]]:
    """2D/2.5D: axial slices (k axis) as (S, C, X, Y); C = 1 (2d) or 3 neighbours (2.5d)."""
    depth = volume.shape[2]
    idx = list(range(depth)) if n <= 0 or n >= depth else [int(round(v)) for v in np.linspace(0, depth - 1, n)]
    if mode == "2d":
        stack = np.stack([volume[:, :, k][None] for k in idx])
    else:
        stack = np.stack([np.stack([volume[:, :, min(max(k + d, 0), depth - 1)] for d in (-1, 0, 1)]) for k in idx])
    return stack.astype(np.float32), idx


def to_model_layout(tensor: np.ndarray, plan: Plan) -> tuple[np.ndarray, list[int] | None]:
    """Step 3: (C, X, Y, Z) for 3D models, (S, C, X, Y) axial slices for 2D/2.5D; float32, contiguous."""
    if plan.mode != "3d":
        stack, idx = to_slices(tensor, plan.mode, plan.slices_per_case)
        return np.ascontiguousarray(stack, dtype=np.float32), idx
    return np.ascontiguousarray(tensor[None], dtype=np.float32), None


@dataclass
class PreparedCase:
    """A model tensor and the geometry that takes its maps back to the native grid."""

    tensor: np.ndarray
    tensor_affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    modality: str
    stats: dict = field(default_factory=dict)
    slice_index: list[int] | None = None
    notes: list[str] = field(default_factory=list)


def finish_case(data: np.ndarray, affine: np.ndarray, modality: str, plan: Plan, native_shape,
                native_affine: np.ndarray, resampling: dict | None = None) -> PreparedCase:
    """Steps 2 and 3 on a canonical array (ingest calls this on its cached volumes). `resampling`: `data` is
    already on the plan's grid (`plan_resample`'s output; this is its record), so only step 2b is left."""
    if resampling is None:
        tensor, t_aff, stats = apply_plan(data, affine, modality, plan)
    else:
        tensor, t_aff, stats = plan_normalize(data, affine, modality, plan, resampling)
    model_tensor, idx = to_model_layout(tensor, plan)
    return PreparedCase(model_tensor, t_aff, tuple(int(n) for n in native_shape[:3]), np.asarray(native_affine),
                        modality, stats, idx)


def preprocess_case(volume: Volume, modality: str, plan: Plan) -> PreparedCase:
    """The one path from a native `Volume` to a model tensor: ingest, predict and serving all use it."""
    data, affine = canonicalize(volume, modality, plan.reader.max_case_bytes)
    case = finish_case(data, affine, modality, plan, volume.data.shape, volume.affine)
    case.notes = list(volume.meta.get("notes", []))
    return case
