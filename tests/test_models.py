"""Network options that make Grad-CAM localisable: dilated last stages, replicate padding, LSE head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core.models import EvidencePool, ModelSpec, SliceMIL, build_model


def _spec(**kw) -> ModelSpec:
    base = {"name": "resnet10", "spatial_dims": 3, "in_channels": 1, "n_classes": 2, "input_ndim": 3}
    return ModelSpec(**{**base, **kw})


def _layer4_shape(net: nn.Module, x: torch.Tensor) -> tuple:
    out = {}
    h = net.layer4.register_forward_hook(lambda m, i, o: out.__setitem__("s", tuple(o.shape[2:])))
    with torch.no_grad():
        net(x)
    h.remove()
    return out["s"]


@pytest.mark.parametrize(("stride", "cells"), [(32, (2, 2, 2)), (16, (3, 3, 3)), (8, (6, 6, 6))])
def test_output_stride_sets_the_last_stage_grid_with_the_same_weights(stride, cells):
    net = build_model(_spec(output_stride=stride)).eval()
    assert _layer4_shape(net, torch.zeros(1, 1, 48, 48, 48)) == cells
    classic = build_model(_spec())
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in classic.state_dict().items()}


def test_replicate_padding_gives_no_cell_a_view_of_the_border():
    """On uniform surroundings every layer-4 cell computes the same features with replicate
    padding; zero padding makes the border visible to every cell (its receptive field spans the
    volume), so a cell can learn to collect a finding's evidence at a fixed place."""
    torch.manual_seed(0)
    net = build_model(_spec(output_stride=8, padding="replicate")).eval()
    zero_padded = build_model(_spec(output_stride=8)).eval()
    zero_padded.load_state_dict(net.state_dict())
    x = torch.full((1, 1, 48, 48, 48), 0.7)
    spread = {}
    for name, model in (("replicate", net), ("zeros", zero_padded)):
        feats = {}
        model.layer4.register_forward_hook(lambda m, i, o, store=feats: store.__setitem__("a", o))
        with torch.no_grad():
            model(x)
        a = feats["a"][0].flatten(1)  # (channels, cells)
        spread[name] = float((a.std(dim=1) / a.abs().mean().clamp(min=1e-12)).mean())
    assert spread["replicate"] < 1e-5
    assert spread["zeros"] > 0.01


def test_lse_head_lies_between_mean_and_max_of_the_cell_scores():
    head = EvidencePool(3, in_features=4, n_classes=2, sharpness=5.0)
    x = torch.randn(3, 4, 5, 5, 5)
    scores = head.evidence(x).flatten(2)
    pooled = head(x)
    assert pooled.shape == (3, 2)
    assert torch.all(pooled >= scores.mean(-1) - 1e-6) and torch.all(pooled <= scores.amax(-1) + 1e-6)
    one_hot = torch.zeros(1, 4, 2, 2, 2)
    head.evidence.weight.data.zero_()
    head.evidence.bias.data.zero_()
    assert head(one_hot)[0, 0].item() == pytest.approx(0.0, abs=1e-6)  # equal cells: LSE = the common score
    assert math.isclose(head.sharpness, 5.0)


@pytest.mark.parametrize(("dims", "input_ndim"), [(3, 3), (2, 3), (2, 2)])
def test_lse_networks_build_and_classify(dims, input_ndim):
    net = build_model(_spec(spatial_dims=dims, input_ndim=input_ndim, pool="lse", output_stride=8,
                            padding="replicate")).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *([32] * input_ndim)))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    if dims == 2 and input_ndim == 3:
        assert isinstance(net, SliceMIL) and net.head is None
