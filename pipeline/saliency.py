"""Grad-CAM / Grad-CAM++ maps for the ResDx networks, and their way back to the scanner grid.

Built on `monai.visualize`. Two places where it falls short are handled here:
- its default normalizer maps (min, max) to (1, 0), i.e. flips the map (MONAI tutorials
  issue 1796): we pass our own, so high always means "supports the class";
- `class_idx` is one index for the whole batch (MONAI issue 8573): we explain one case at a
  time, each for its own class.
For 2D networks applied to slices of a volume (`SliceMIL`), MONAI's upsampler would resize
slice maps to the volume's shape; we compute the map per slice on the 2D backbone and place
the slices back at their k positions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.models import SliceMIL
from pipeline.preprocess import resample_to_grid


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-sample scaling to [0, 1], keeping polarity (MONAI's default flips it)."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def _cam(model: nn.Module, layer: str, method: str):
    from monai.visualize import GradCAM, GradCAMpp

    cls = GradCAMpp if method == "gradcampp" else GradCAM
    return cls(nn_module=model, target_layers=layer, postprocessing=_minmax)


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


def saliency(model: nn.Module, x: torch.Tensor, class_index: int | None = None, method: str = "gradcam",
             target_layer: str = "layer4") -> tuple[np.ndarray, int, np.ndarray]:
    """Map for one case `x` (C, *spatial) in the tensor grid, in [0, 1].

    Returns (map with x's spatial shape, the explained class, the class probabilities).
    """
    model.eval()
    inner = model.backbone if isinstance(model, SliceMIL) else model
    target_layer = resolve_layer(inner, target_layer)
    xb = x.unsqueeze(0).float()
    with torch.no_grad():
        probs = torch.softmax(model(xb), dim=1)[0]
    cls = int(probs.argmax()) if class_index is None else int(class_index)
    if isinstance(model, SliceMIL):
        cam_map = _slice_mil_cam(model, xb, cls, method, target_layer)
    else:
        cam_map = _cam(model, target_layer, method)(xb, class_idx=cls)[0, 0]
    return cam_map.detach().cpu().numpy().astype(np.float32), cls, probs.detach().cpu().numpy()


def _slice_mil_cam(model: SliceMIL, xb: torch.Tensor, cls: int, method: str, target_layer: str) -> torch.Tensor:
    """Grad-CAM of the bag's class score w.r.t. the 2D backbone's layer, slice by slice."""
    layer = dict(model.backbone.named_modules())[target_layer]
    store: dict = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("grad", go[0]))
    try:
        model.zero_grad(set_to_none=True)
        score = model(xb.requires_grad_(True))[0, cls]
        score.backward()
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
    cams = torch.relu((weights * act).sum(dim=1, keepdim=True))  # (S, 1, h, w)
    cams = nn.functional.interpolate(cams, size=xb.shape[2:4], mode="bilinear", align_corners=False)[:, 0]
    out = torch.zeros(xb.shape[2:], device=xb.device)
    idx = model.slice_index(xb.shape[-1])
    out[..., idx] = cams.permute(1, 2, 0)
    return _minmax(out[None])[0]


def to_native(cam_map: np.ndarray, tensor_affine: np.ndarray, native_shape, native_affine: np.ndarray
              ) -> np.ndarray:
    """Take a map from the tensor grid back to the case's original voxel grid (inverse of ingest's
    reorientation, resampling and crop/pad, via the two voxel-to-RAS affines). Outside the
    tensor's field of view the map is 0."""
    return resample_to_grid(cam_map, np.asarray(tensor_affine), tuple(native_shape)[:3], np.asarray(native_affine),
                            order=1, fill=0.0)


def native_saliency(model: nn.Module, tensor: torch.Tensor, tensor_affine, native_shape, native_affine,
                    class_index: int | None = None, method: str = "gradcam", target_layer: str = "layer4"
                    ) -> np.ndarray:
    """One case's map on its native grid: what `resdx predict --saliency` writes as an overlay."""
    cam_map, _, _ = saliency(model, tensor, class_index, method, target_layer)
    if cam_map.ndim == 2:
        return cam_map
    return to_native(cam_map, tensor_affine, native_shape, native_affine)


def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """The model with every parameter re-initialised (Adebayo et al.'s model randomization test)."""
    import copy

    rand = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in rand.modules():
        if hasattr(m, "reset_parameters") and m is not rand:
            m.reset_parameters()
    return rand.eval()
