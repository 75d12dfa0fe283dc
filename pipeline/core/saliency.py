"""Grad-CAM / Grad-CAM++ maps for the ResDx networks, and their way back to the scanner grid.

The maps are `monai.visualize` GradCAM / GradCAMpp `compute_map`s (class-weighted activations of
the target layer, ReLU'd). Where MONAI falls short, this module does the rest itself:
- polarity: its default normalizer maps (min, max) to (1, 0), i.e. flips the map (MONAI tutorials
  issue 1796); ours keeps high = "supports the class";
- one class per call: `class_idx` is one index for the whole batch (MONAI issue 8573), so each
  case is explained on its own, for its own class;
- target: the class's logit minus the mean logit. Softmax ignores any term shared by all logits,
  so the raw logit's map can show evidence that favours no class; for two classes this is half
  the log-odds. A multi-label network's labels are independent sigmoids: there the target is the
  label's own logit (`centered=False`);
- geometry: its upsampler (`F.interpolate(align_corners=False)`) stretches the coarse map over the
  input as if feature cell i were centred at (i + 0.5) * stride - 0.5; in a ResNet ('same'-padded
  convolutions) cell i is centred on input voxel i * stride: at stride 8 that is 3.5 voxels off.
  We interpolate on the network's own sampling grid, with a cubic spline;
- resolution: a stride-s stage samples the evidence every s voxels, coarser than a small lesion.
  `shifts` > 1 re-runs the map on copies of the input shifted by s / shifts voxels per axis and
  interleaves the cells (exact for a translation-equivariant network, e.g. replicate padding),
  in the spirit of Morbidelli et al., "Augmented Grad-CAM" (ICASSP 2020).
For 2D networks applied to slices of a volume (`SliceMIL`) the map is computed per slice on the
2D backbone, placed back at the slices' k positions and interpolated along k in between.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.core.classifier import Classifier, explained_class
from pipeline.core.models import SliceMIL
from pipeline.core.preprocess import resample_to_grid


def _minmax(x: np.ndarray) -> np.ndarray:
    """Scaling to [0, 1], keeping polarity (MONAI's default normalizer flips it)."""
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / max(hi - lo, 1e-12)).astype(np.float32)


class _Centered(nn.Module):
    """Logits minus their mean over classes: the part of each class score softmax sees (`centered`
    False: the logits themselves, for independent sigmoids)."""

    def __init__(self, net: nn.Module, centered: bool = True):
        super().__init__()
        self.net = net
        self.centered = centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits - logits.mean(dim=1, keepdim=True) if self.centered else logits


def _stride(n_in: int, n_feat: int) -> int | None:
    """The power-of-two stride s with ceil(n_in / s) == n_feat ('same'-padded stages), else None."""
    s = 1
    while s <= n_in:
        if -(-n_in // s) == n_feat:
            return s
        s *= 2
    return None


def _positions(n_in: int, n_feat: int, step: float | None) -> np.ndarray:
    """Each input voxel's coordinate on the feature grid."""
    if step is None or n_feat == 1:  # not a 'same'-padded net (plain CNN): MONAI's grid
        return (np.arange(n_in) + 0.5) * n_feat / n_in - 0.5
    return np.arange(n_in) / step  # cell i sits on voxel i * step


def upsample(cells: np.ndarray, spatial_size, steps) -> np.ndarray:
    """Cubic-spline interpolation of a cell grid to `spatial_size` voxels, cell i at voxel i * step
    (step None: MONAI's stretched grid). Clipped at 0 (a spline overshoots around sharp peaks)."""
    from scipy.ndimage import map_coordinates

    axes = [_positions(int(n), c, st) for n, c, st in zip(spatial_size, cells.shape, steps)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    out = map_coordinates(cells.astype(np.float64), coords, order=3, mode="nearest")
    return np.clip(out, 0.0, None)


def _shift(x: torch.Tensor, offsets) -> torch.Tensor:
    """x[..., p + d] per spatial axis (edge voxels repeated past the end)."""
    for axis, d in enumerate(offsets):
        if d:
            n = x.shape[2 + axis]
            idx = torch.clamp(torch.arange(n, device=x.device) + int(d), max=n - 1)
            x = x.index_select(2 + axis, idx)
    return x


def _cam(model: nn.Module, layer: str, method: str, centered: bool = True):
    from monai.visualize import GradCAM, GradCAMpp

    cls = GradCAMpp if method == "gradcampp" else GradCAM
    # MONAI restores the wrapper's training flag onto the whole network after each call: give the wrapper
    # the network's own flag (a fresh module is in training mode, which would leave BatchNorm in it).
    return cls(nn_module=_Centered(model, centered).train(model.training), target_layers=f"net.{layer}")


def resolve_layer(model: nn.Module, target_layer: str) -> str:
    """The configured layer, or the network's own `cam_layer` (the plain CNN has no `layer4`)."""
    names = dict(model.named_modules())
    if target_layer in names:
        return target_layer
    fallback = getattr(model, "cam_layer", None)
    if fallback in names:
        return fallback
    top = [n for n in names if n and "." not in n]
    raise ValueError(f"explain.target_layer={target_layer!r} is not a layer of this network; choose one of {top}")


def class_map(model: nn.Module, xb: torch.Tensor, cls: int, method: str = "gradcam", target_layer: str = "layer4",
              shifts: int = 1, centered: bool = True) -> np.ndarray:
    """The map of class `cls` for a batch of one (1, C, *spatial), in the input grid, in [0, 1]
    (`centered` False for a multi-label network: the label's own logit is explained)."""
    if hasattr(model, "member_logits"):  # a fold ensemble: the mean of its members' maps, each in [0, 1]
        maps = [class_map(m, xb, cls, method, target_layer, shifts, centered) for m in model.members]
        return _minmax(np.mean(maps, axis=0))
    if isinstance(model, SliceMIL):
        return _slice_mil_cam(model, xb, cls, method, resolve_layer(model.backbone, target_layer), centered)
    cam = _cam(model, resolve_layer(model, target_layer), method, centered)

    def cells(x: torch.Tensor) -> np.ndarray:
        m = cam.compute_map(x, class_idx=cls)[0, 0].detach().cpu().double().numpy()
        if method == "gradcampp":
            # MONAI's Grad-CAM++ weights carry exp(class score), a factor that differs between
            # shifted copies; divided out, interleaved cells share one scale.
            m = m / math.exp(min(float(cam.nn_module.score.detach().float().mean()), 700.0))
        return m

    first = cells(xb)
    size = xb.shape[2:]
    strides = [_stride(int(n), c) for n, c in zip(size, first.shape)]
    k = shifts if all(s is not None and s % shifts == 0 and c > 1 for s, c in zip(strides, first.shape)) else 1
    if k == 1:
        return _minmax(upsample(first, size, strides))
    fine = np.zeros([c * k for c in first.shape], dtype=np.float64)
    for offs in itertools.product(range(k), repeat=len(size)):
        part = first if not any(offs) else cells(_shift(xb, [o * s // k for o, s in zip(offs, strides)]))
        fine[tuple(slice(o, None, k) for o in offs)] = part
    return _minmax(upsample(fine, size, [s / k for s in strides]))


@dataclass
class Explanation:
    """One case's map and the decision it explains (the same in explain, predict and serving)."""

    cam: np.ndarray            # the tensor grid, in [0, 1]
    explained_class: int
    probs: np.ndarray          # calibrated (K,)
    decision: int              # multi-label: the decision on the explained label
    decisions: np.ndarray | None = None  # multi-label: every label's decision (L,)
    uncertainty: float = 0.0   # the spread over the classifier's views (members x test-time transforms)
    referred: bool = False     # the rule's referral for this case


def explain_case(clf: Classifier, x: torch.Tensor, class_index: int | None = None, method: str = "gradcam",
                 target_layer: str = "layer4", shifts: int = 2) -> Explanation:
    """Map of one case `x` (C, *spatial) for the class the calibrated decision chose
    (or a fixed `class_index`), with the given method and shifted re-runs. Multi-label: the most
    probable label decided present (label 0 when none is), its own logit explained."""
    # assess, not predict: the same views give the decision, its spread and the referral in one pass.
    a = clf.assess(x.unsqueeze(0))
    probs, decision, extra = a.probs, a.decisions, {"uncertainty": float(a.uncertainty[0]),
                                                     "referred": bool(a.referred[0])}
    multi = clf.rule.multi_label
    chosen = clf.rule.explained_label(probs[0], decision[0]) if multi else int(decision[0])
    cls = explained_class(chosen, class_index)
    device = next(clf.model.parameters()).device  # the served model may sit on a GPU, the tensor on the host
    cam = class_map(clf.model, x.unsqueeze(0).float().to(device), cls, method, target_layer, shifts, not multi)
    if multi:
        return Explanation(cam, cls, probs[0], int(decision[0][cls]), decision[0], **extra)
    return Explanation(cam, cls, probs[0], int(decision[0]), **extra)


def _slice_mil_cam(model: SliceMIL, xb: torch.Tensor, cls: int, method: str, target_layer: str,
                   centered: bool = True) -> np.ndarray:
    """Grad-CAM of the bag's centred class score w.r.t. the 2D backbone's layer, slice by slice
    (MONAI's CAM classes explain the network they wrap; here the layer runs once per slice)."""
    layer = dict(model.backbone.named_modules())[target_layer]
    store: dict = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("grad", go[0]))
    try:
        model.zero_grad(set_to_none=True)
        logits = model(xb.requires_grad_(True))[0]
        (logits[cls] - logits.mean() if centered else logits[cls]).backward()
    finally:
        h1.remove()
        h2.remove()
    act, grad = store["act"], store["grad"]  # (S, F, h, w)
    if method == "gradcampp":
        g2, g3 = grad.pow(2), grad.pow(3)
        alpha = g2 / (2 * g2 + (act * g3).sum(dim=(2, 3), keepdim=True)).clamp(min=1e-12)
        weights = (alpha * torch.relu(grad)).sum(dim=(2, 3), keepdim=True)
    else:
        weights = grad.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * act).sum(dim=1)).detach().cpu().numpy()  # (S, h, w)
    size = xb.shape[2:4]
    strides = [_stride(int(n), c) for n, c in zip(size, cams.shape[1:])]
    planes = np.stack([upsample(c, size, strides) for c in cams], axis=-1)  # (X, Y, S)
    idx = model.slice_index(xb.shape[-1]).numpy()
    if len(idx) == 1:
        return _minmax(np.repeat(planes, xb.shape[-1], axis=-1))
    # Slices between the bag's are interpolated along k, as the in-plane cells are upsampled.
    from scipy.interpolate import interp1d

    return _minmax(interp1d(idx, planes, axis=-1)(np.arange(xb.shape[-1])))


def to_native(cam_map: np.ndarray, tensor_affine: np.ndarray, native_shape, native_affine: np.ndarray
              ) -> np.ndarray:
    """Take a map from the tensor grid back to the case's original voxel grid (inverse of ingest's
    reorientation, resampling and crop/pad, via the two voxel-to-RAS affines). Outside the
    tensor's field of view the map is 0."""
    return resample_to_grid(cam_map, np.asarray(tensor_affine), tuple(native_shape)[:3], np.asarray(native_affine),
                            order=1, fill=0.0)


def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """The model with every parameter re-initialised (Adebayo et al.'s model randomization test)."""
    import copy

    rand = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in rand.modules():
        if hasattr(m, "reset_parameters") and m is not rand:
            m.reset_parameters()
    return rand.eval()
