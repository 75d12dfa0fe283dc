"""Grad-CAM / Grad-CAM++ maps for the ResDx networks, and their way back to the scanner grid.

The maps are `monai.visualize` GradCAM / GradCAMpp `compute_map`s (class-weighted activations of
the target layer, ReLU'd), computed by `_layer_cells` with the same formulas (tested against MONAI) and a
backward that stops at the layer. Where MONAI falls short, this module does the rest itself:
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
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.core.classifier import Classifier, explained_class
from pipeline.core.models import SliceMIL
from pipeline.core.preprocess import resample_to_grid, spline_axis


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
    (step None: MONAI's stretched grid). Clipped at 0 (a spline overshoots around sharp peaks).
    scipy's `map_coordinates(order=3, mode="nearest")`, one axis at a time (`spline_axis`): the grid is
    axis-aligned, so the 3D spline is separable, and 3 passes cost a fraction of 4^3 taps per voxel."""
    out = cells.astype(np.float64)
    for axis, (n, c, st) in enumerate(zip(spatial_size, cells.shape, steps)):
        out = spline_axis(out, axis, _positions(int(n), c, st))
    return np.clip(out, 0.0, None)


def _shift(x: torch.Tensor, offsets) -> torch.Tensor:
    """x[..., p + d] per spatial axis (edge voxels repeated past the end)."""
    for axis, d in enumerate(offsets):
        if d:
            n = x.shape[2 + axis]
            idx = torch.clamp(torch.arange(n, device=x.device) + int(d), max=n - 1)
            x = x.index_select(2 + axis, idx)
    return x


def _layer_cells(model: nn.Module, layer: str, xb: torch.Tensor, cls: int, method: str,
                 centered: bool = True) -> np.ndarray:
    """Grad-CAM / Grad-CAM++ cells of `layer` for every case of the batch `xb`, (B, *cells), float64.

    The formulas are MONAI's `GradCAM.compute_map` / `GradCAMpp.compute_map` (tested against them), computed
    here because MONAI's `ModelWithHooks` back-propagates the score to every parameter and to the input,
    while a map needs only d(score)/d(activations) at the layer: the head's backward. The layer's output is
    taken as a fresh leaf and `autograd.grad` stops there, which saves about two thirds of the work. Every
    case of the batch is explained for the same class (the shifted copies of one case), each by its own score.
    Grad-CAM++ leaves out MONAI's exp(score) factor: it differs between shifted copies, and interleaved
    cells must share one scale.
    """
    module = dict(model.named_modules())[layer]
    store: dict = {}

    def keep(_mod, _inp, out):
        # Up to here the forward ran without autograd (nothing to record); from here on it records.
        torch.set_grad_enabled(True)
        store["act"] = out.detach().requires_grad_(True)
        return store["act"]

    was_training = model.training
    model.eval()  # as MONAI's hooks do: BatchNorm statistics, no dropout
    handle = module.register_forward_hook(keep)
    try:
        with torch.no_grad():  # `keep` turns autograd on at the layer; leaving this block restores the mode
            logits = _Centered(model, centered)(xb)
            act = store["act"]
            (grad,) = torch.autograd.grad(logits[:, cls].sum(), act)
    finally:
        handle.remove()
        model.train(was_training)
    act = act.detach()
    b, c = grad.shape[:2]
    ones = [1] * (grad.ndim - 2)
    if method == "gradcampp":
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + act.mul(grad.pow(3)).view(b, c, -1).sum(-1).view(b, c, *ones)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        weights = (alpha_nr.div(alpha_dr + 1e-7) * torch.relu(grad)).view(b, c, -1).sum(-1).view(b, c, *ones)
    else:
        weights = grad.view(b, c, -1).mean(2).view(b, c, *ones)
    return torch.relu((weights * act).sum(1)).cpu().double().numpy()


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


def _cells_of(model: nn.Module, layer: str, copies: list[torch.Tensor], cls: int, method: str, centered: bool,
              batch_size: int) -> list[np.ndarray]:
    """`_layer_cells` of every input copy (each (1, C, *spatial)), `batch_size` copies per forward pass."""
    return [cells for i in range(0, len(copies), batch_size)
            for cells in _layer_cells(model, layer, torch.cat(copies[i:i + batch_size]), cls, method, centered)]


def class_map(model: nn.Module, xb: torch.Tensor, cls: int, method: str = "gradcam", target_layer: str = "layer4",
              shifts: int = 1, centered: bool = True, batch_size: int = 8, reflect: bool = False) -> np.ndarray:
    """The map of class `cls` for a batch of one (1, C, *spatial), in the input grid, in [0, 1]
    (`centered` False for a multi-label network: the label's own logit is explained). The shifted
    copies go through the network `batch_size` at a time.

    `reflect`: the mean of the maps of the input and of its point reflection (every axis flipped, one of the
    test-time views the classifier averages), flipped back. Which of the cells around a finding lights up is
    a convention the network learns (its evidence may sit a few voxels to one side of the finding, in a
    direction that changes from one training run to the next); the reflection reverses that direction, so
    the mean is centred on the finding (README "Saliency").
    """
    if hasattr(model, "member_logits"):  # a fold ensemble: the mean of its members' maps, each in [0, 1]
        maps = [class_map(m, xb, cls, method, target_layer, shifts, centered, batch_size, reflect)
                for m in model.members]
        return _minmax(np.mean(maps, axis=0))
    axes = list(range(2, xb.ndim))
    views = [xb, xb.flip(axes)] if reflect else [xb]
    if isinstance(model, SliceMIL):
        maps = [_slice_mil_cam(model, v, cls, method, resolve_layer(model.backbone, target_layer), centered)
                for v in views]
    else:
        maps = _shifted_maps(model, resolve_layer(model, target_layer), views, cls, method, shifts, centered,
                             batch_size)
    if reflect:
        return _minmax((maps[0] + np.flip(maps[1], axis=tuple(range(maps[1].ndim)))) / 2)
    return maps[0]


def _shifted_maps(model: nn.Module, layer: str, views: list[torch.Tensor], cls: int, method: str, shifts: int,
                  centered: bool, batch_size: int) -> list[np.ndarray]:
    """Each view's map in [0, 1]: its cells, refined by `shifts` interleaved shifted copies per axis."""
    firsts = _cells_of(model, layer, views, cls, method, centered, batch_size)
    cells, size = firsts[0].shape, views[0].shape[2:]
    strides = [_stride(int(n), c) for n, c in zip(size, cells)]
    k = shifts if all(s is not None and s % shifts == 0 and c > 1 for s, c in zip(strides, cells)) else 1
    if k == 1:
        return [_minmax(upsample(first, size, strides)) for first in firsts]
    offsets = list(itertools.product(range(k), repeat=len(size)))[1:]
    copies = [_shift(v, [o * s // k for o, s in zip(offs, strides)]) for v in views for offs in offsets]
    parts = _cells_of(model, layer, copies, cls, method, centered, batch_size)
    maps = []
    for n, first in enumerate(firsts):
        fine = np.zeros([c * k for c in cells], dtype=np.float64)
        for offs, part in zip([(0,) * len(size), *offsets], [first, *parts[n * len(offsets):(n + 1) * len(offsets)]]):
            fine[tuple(slice(o, None, k) for o in offs)] = part
        maps.append(_minmax(upsample(fine, size, [s / k for s in strides])))
    return maps


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
                 target_layer: str = "layer4", shifts: int = 2, reflect: bool = False) -> Explanation:
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
    cam = class_map(clf.model, x.unsqueeze(0).float().to(device), cls, method, target_layer, shifts, not multi,
                    max(clf.batch_size, 1), reflect)
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
