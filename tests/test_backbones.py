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


@pytest.mark.parametrize("name", ["resnet18", "small_cnn", "monai:efficientnet-b0"])
def test_patch_encoder_with_any_backbone_trains_saves_loads_and_exports(name, tmp_path):
    """The encoder's feature layer and head on a new backbone; the same strict checkpoint and TorchScript export
    paths as the paper's backbones."""
    from monai_wsi_ext.model.networks import PatchEncoder, load_checkpoint

    torch.manual_seed(0)
    enc = PatchEncoder(name, feature_dim=16)
    x = torch.rand(4, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(enc(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert enc.feature.weight.shape == (16, enc.backbone.out_features)
    assert enc.backbone.parameters().__next__().grad is not None
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    again = PatchEncoder(name, feature_dim=16)
    load_checkpoint(again, tmp_path / "encoder.pt", option="encoder_ckpt")
    enc.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.features(x), enc.features(x))
    other = PatchEncoder("googlenet", feature_dim=16)
    with pytest.raises(ConfigError, match="encoder_ckpt"):
        load_checkpoint(other, tmp_path / "encoder.pt", option="encoder_ckpt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation
        scripted = torch.jit.script(enc)
    with torch.no_grad():
        torch.testing.assert_close(scripted.features(x), enc.features(x))


# every backbone of bundle/docs/encoders.md's table
TABLE_BACKBONES = ["googlenet", "densenet121", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn",
                   "efficientnet_b0", "mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny", "monai:seresnet50",
                   "monai:efficientnet-b0", "small_cnn"]


@pytest.mark.parametrize("name", TABLE_BACKBONES)
def test_every_table_backbone_builds_encodes_and_reloads(name, tmp_path):
    """Each backbone of the docs table as a ``PatchEncoder``: features of ``feature_dim``, head logits, and a strict
    reload of its state dict giving the same features."""
    from monai_wsi_ext.model.networks import PatchEncoder, load_checkpoint

    torch.manual_seed(0)
    enc = PatchEncoder(name, feature_dim=16).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = enc.features(x), enc(x)
    assert feats.shape == (2, 16) and logits.shape == (2, 2) and torch.isfinite(feats).all()
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    again = PatchEncoder(name, feature_dim=16).eval()
    load_checkpoint(again, tmp_path / "encoder.pt", option="encoder_ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again.features(x), feats)


@pytest.mark.parametrize("name", [b for b in TABLE_BACKBONES if b != "googlenet"])
def test_every_table_backbone_exports_to_onnx(name):
    """The ONNX export (the default export path) of an encoder on every backbone of the docs table (GoogLeNet's
    export is tested in test_runtime.py), checked against eager with ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from monai_wsi_ext.model.networks import PatchEncoder
    from monai_wsi_ext.runtime.backends import open_session
    from monai_wsi_ext.runtime.onnx import export_onnx, onnx_max_abs_diff

    torch.manual_seed(0)
    enc = PatchEncoder(name, feature_dim=16).eval()
    model = export_onnx(enc, "encoder", example=torch.rand(2, 3, 64, 64))
    diff = onnx_max_abs_diff(open_session(model, "onnxruntime"), enc, "encoder", torch.rand(3, 3, 64, 64))
    assert set(diff) == {"features", "logits"} and max(diff.values()) < 1e-4, diff
