"""Backbones beyond GoogLeNet/DenseNet121 (issue 13 item 1): torchvision models by name, MONAI classification
nets, a small CNN; each gives a pooled vector of its declared width, random weights, no download."""

from __future__ import annotations

import pytest
import torch

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "small_cnn",
                                  "monai:densenet121"])
def test_backbone_gives_its_pooled_vector(name):
    torch.manual_seed(0)
    net = build_backbone(name).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, net.out_features) and torch.isfinite(out).all()


def test_torchvision_weights_keep_their_key_names(tmp_path):
    """A local torchvision state dict (e.g. ImageNet weights saved from another machine) loads into the backbone
    by its own key names; only the removed classifier is left over."""
    import torchvision.models as tvm

    source = tvm.resnet18(weights=None)
    net = build_backbone("resnet18")
    result = net.load_state_dict(source.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(net.conv1.weight, source.conv1.weight)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("resnet_18")
    with pytest.raises(ConfigError, match="densenet121"):
        build_backbone("monai:unet")
