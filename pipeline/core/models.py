"""Model factory: MONAI ResNets (2D/3D) and the plain, non-residual CNN baseline.

A checkpoint stores `ModelSpec` (JSON) beside its safetensors weights, so `build_model`
rebuilds the exact network without the training code's state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

RESNET_LAYERS = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: architecture and the data it expects."""

    name: str
    spatial_dims: int  # of the network (2 or 3)
    in_channels: int
    n_classes: int
    input_ndim: int  # spatial dims of the input tensors (3 for volumes; a 2D net on volumes uses slices)
    conv1_t_stride: int = 2
    conv1_t_size: int = 7
    slices_2d: int = 16
    dropout: float = 0.0
    pool: str = "avg"  # global pooling of the last stage: avg (MONAI's), max, or lse (class-evidence maps)
    output_stride: int = 32  # 16 / 8: layer4 (and layer3) dilated instead of strided
    padding: str = "zeros"  # convolutions' padding mode: zeros (MONAI's) or replicate
    width: int = 64  # channels of the first residual stage, doubled per stage (64: MONAI's 64-128-256-512)
    max_channels: int = 512  # no stage wider than this (nnU-Net's max_num_features): 512 leaves MONAI's as they are
    n_members: int = 1  # > 1: a fold ensemble of this many copies (`EnsembleNet`), one weights file

    def to_dict(self) -> dict:
        return asdict(self)


class PlainCNN(nn.Module):
    """The write-up's non-residual baseline (the Keras CIFAR-10 CNN): conv32-conv32-maxpool,
    conv64-conv64-maxpool, dense 512, softmax (here: logits; the loss applies softmax).

    An adaptive average pool to 4 per axis before the dense layer keeps it input-size-agnostic
    (a plain flatten of a 48^3 volume would need a 56M-parameter dense layer).
    """

    def __init__(self, spatial_dims: int, in_channels: int, n_classes: int, dropout: float = 0.25):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        adaptive = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
        drop = dropout or 0.25
        self.block1 = nn.Sequential(conv(in_channels, 32, 3, padding=1), nn.ReLU(), conv(32, 32, 3), nn.ReLU(),
                                    pool(2), nn.Dropout(drop))
        self.block2 = nn.Sequential(conv(32, 64, 3, padding=1), nn.ReLU(), conv(64, 64, 3), nn.ReLU(), pool(2),
                                    nn.Dropout(drop))
        self.pool = adaptive(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4**spatial_dims, 512), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(512, n_classes))

    cam_layer = "block2"  # its last convolutional stage, for Grad-CAM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block2(self.block1(x))))


class EvidencePool(nn.Module):
    """Head that scores every cell of the last stage, then pools the class-evidence maps by
    log-sum-exp (Pinheiro & Collobert 2015; Wang et al. 2017, ChestX-ray8).

    With average pooling a network may show its evidence anywhere its (whole-volume) receptive
    field reaches, e.g. as a constant offset at the borders, and Grad-CAM then points there. Here
    a negative case's highest-scoring cell must stay low, so normal tissue scores low everywhere
    and the case's score rises only where the finding is: the map Grad-CAM reads is that score.
    `sharpness` r moves between the mean (r -> 0) and the max (r -> inf).
    """

    def __init__(self, spatial_dims: int, in_features: int, n_classes: int, sharpness: float = 5.0):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.evidence = conv(in_features, n_classes, kernel_size=1)
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.evidence(x).flatten(2)  # (B, classes, cells)
        r = self.sharpness
        return (torch.logsumexp(r * e, dim=-1) - math.log(e.shape[-1])) / r


class SliceMIL(nn.Module):
    """A 2D backbone applied to axial slices of a volume; slice features max-pooled per case.

    Input (B, C, X, Y, Z): `n_slices` evenly spaced k-slices are classified as a bag, so a
    lesion visible on a few slices drives the case's prediction (multiple-instance learning).
    With `n_features=None` the backbone scores each slice itself (an `EvidencePool` head) and the
    slices' scores are log-sum-exp pooled with the same sharpness.
    """

    def __init__(self, backbone: nn.Module, n_features: int | None, n_classes: int, n_slices: int,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.n_slices = n_slices
        self.head = None if n_features is None else nn.Sequential(nn.Dropout(dropout), nn.Linear(n_features, n_classes))

    def slice_index(self, depth: int) -> torch.Tensor:
        n = min(self.n_slices, depth)
        return torch.linspace(0, depth - 1, n).round().long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        idx = self.slice_index(x.shape[-1]).to(x.device)
        slices = x.index_select(-1, idx).permute(0, 4, 1, 2, 3).reshape(b * len(idx), c, *x.shape[2:4])
        feats = self.backbone(slices).reshape(b, len(idx), -1)
        if self.head is None:
            r = self.backbone.avgpool.sharpness
            return (torch.logsumexp(r * feats, dim=1) - math.log(len(idx))) / r
        return self.head(feats.max(dim=1).values)


def stage_channels(spec: ModelSpec) -> list[int]:
    """Channels of the four residual stages: `width` doubled per stage, capped at `max_channels`."""
    return [min(spec.width * 2**k, spec.max_channels) for k in range(4)]


def _resnet(spec: ModelSpec, feed_forward: bool) -> nn.Module:
    from monai.networks.nets import ResNet

    block, layers = RESNET_LAYERS[spec.name]
    net = ResNet(
        block=block, layers=layers, block_inplanes=stage_channels(spec),
        spatial_dims=spec.spatial_dims,
        n_input_channels=spec.in_channels, num_classes=spec.n_classes, conv1_t_stride=spec.conv1_t_stride,
        conv1_t_size=spec.conv1_t_size, feed_forward=feed_forward, shortcut_type="B",
    )
    if spec.output_stride < 32:
        _dilate_last_stages(net, ("layer4",) if spec.output_stride == 16 else ("layer3", "layer4"))
    if spec.padding != "zeros":
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                m.padding_mode = spec.padding
                # nn.ConvNd pads non-zero modes itself from this list, fixed at construction
                m._reversed_padding_repeated_twice = [p for n in reversed(m.padding) for p in (n, n)]
    if spec.pool == "lse":
        net.avgpool = EvidencePool(spec.spatial_dims, net.fc.in_features, spec.n_classes)
        net.fc = None  # the head is the evidence convolution (MONAI's forward skips a None fc)
    elif spec.pool == "max":
        # Max pooling of each feature: the decision hinges on its strongest response, not its volume
        # average. For Grad-CAM maps that point at a finding see pool=lse (README, "Saliency").
        net.avgpool = nn.AdaptiveMaxPool3d(1) if spec.spatial_dims == 3 else nn.AdaptiveMaxPool2d(1)
    return net


def _dilate_last_stages(net: nn.Module, stages: tuple[str, ...]) -> None:
    """Replace the stride-2 entry of `stages` by dilation (torchvision's `replace_stride_with_dilation`,
    which MONAI's ResNet lacks). Parameters are unchanged, so pretrained weights still load; only
    the last stages' resolution (and cost) grows."""
    dilation = 1
    for name in stages:
        dilation *= 2
        for m in getattr(net, name).modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                m.stride = (1,) * len(m.stride)
                if max(m.kernel_size) > 1:
                    m.dilation = (dilation,) * len(m.dilation)
                    m.padding = tuple(dilation * (k // 2) for k in m.kernel_size)


class EnsembleNet(nn.Module):
    """The fold models of K-fold cross-validation as one network: its logits are the mean of the
    members' logits (what evaluate, the registry and `predict` serve); `member_logits` keeps the
    members apart for the ensemble's spread (per-case uncertainty) and Grad-CAM (mean of maps).
    One state dict (`members.<k>.*`) holds every member, so one safetensors file is the ensemble."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])  # (K, B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(dim=0)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build an untrained network from its spec (a fold ensemble when `spec.n_members` > 1)."""
    if spec.n_members > 1:
        from dataclasses import replace

        return EnsembleNet([build_model(replace(spec, n_members=1)) for _ in range(spec.n_members)])
    if spec.name == "plain_cnn":
        if spec.spatial_dims == 2 and spec.input_ndim == 3:
            backbone = PlainCNN(2, spec.in_channels, spec.n_classes, spec.dropout)
            backbone.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 512), nn.ReLU())
            return SliceMIL(backbone, 512, spec.n_classes, spec.slices_2d, 0.5)
        return PlainCNN(spec.spatial_dims, spec.in_channels, spec.n_classes, spec.dropout)
    if spec.name not in RESNET_LAYERS:
        raise ValueError(f"unknown model {spec.name!r}; choose one of {sorted(RESNET_LAYERS) + ['plain_cnn']}")
    if spec.spatial_dims == 2 and spec.input_ndim == 3:
        n_features = stage_channels(spec)[-1] * (4 if RESNET_LAYERS[spec.name][0] == "bottleneck" else 1)
        if spec.pool == "lse":  # slices scored by the backbone's evidence head, then pooled
            return SliceMIL(_resnet(spec, feed_forward=True), None, spec.n_classes, spec.slices_2d)
        return SliceMIL(_resnet(spec, feed_forward=False), n_features, spec.n_classes, spec.slices_2d, spec.dropout)
    if spec.spatial_dims != spec.input_ndim:
        raise ValueError(f"a {spec.spatial_dims}D network cannot take {spec.input_ndim}D inputs")
    return _resnet(spec, feed_forward=True)


def load_medicalnet(model: nn.Module, path: Path | str) -> list[str]:
    """Initialise a 3D ResNet from local MedicalNet weights (`state_dict` key, `module.` prefixes).

    The classification head (`fc`) is left as initialised: MedicalNet has none. Loaded with
    `weights_only=True` (no unpickling of code). Returns the keys left at initialisation.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no parameter matches this network; is it a MedicalNet ResNet of the same depth?")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
