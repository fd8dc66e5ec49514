"""Tests of the patch encoders, pretrained loading and the canvas U-Net factory."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch
from parameterized import parameterized

from monai_wsi_ext.model.canvas import IGNORE_INDEX
from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.networks import (
    PatchEncoder,
    canvas_loss,
    load_encoder_checkpoint,
    make_unet,
    read_state_dict,
)

torch.set_num_threads(2)


class _NotATensor:
    """A pickled object that ``weights_only`` loading must refuse."""

    def __init__(self):
        self.value = 3


class TestPatchEncoder(unittest.TestCase):
    @parameterized.expand([("googlenet",), ("densenet121",)])
    def test_shapes(self, backbone):
        torch.manual_seed(0)
        enc = PatchEncoder(backbone=backbone, feature_dim=16, num_classes=2).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            logits, feats = enc(x), enc.features(x)
        self.assertEqual(tuple(logits.shape), (2, 2))
        self.assertEqual(tuple(feats.shape), (2, 16))
        torch.testing.assert_close(logits, enc.head(feats))
        self.assertEqual(enc.feature.in_features, 1024)

    def test_bad_backbone(self):
        with self.assertRaisesRegex(ConfigError, "backbone"):
            PatchEncoder(backbone="resnet")

    def test_feature_relu_option(self):
        enc = PatchEncoder(feature_dim=4, feature_activation="relu").eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(enc(x), enc.head(torch.relu(enc.features(x))))


class TestPretrained(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def test_googlenet_backbone_state_dict(self):
        from torchvision.models import googlenet

        src = googlenet(weights=None, aux_logits=False, init_weights=False)
        sd = src.state_dict()
        sd["conv1.conv.weight"] = torch.full_like(sd["conv1.conv.weight"], 0.125)
        sd["aux_only.weight"] = torch.zeros(2)  # unexpected
        del sd["inception5b.branch1.conv.weight"]  # missing
        path = self.dir / "googlenet.pth"
        torch.save({"state_dict": sd}, path)
        with self.assertLogs("monai_wsi_ext.model.networks", level="WARNING") as logs:
            enc = PatchEncoder("googlenet", pretrained_path=str(path))
        text = "\n".join(logs.output)
        self.assertIn("inception5b.branch1.conv.weight", text)
        self.assertIn("aux_only.weight", text)
        self.assertIn("fc.weight", text)  # the removed ImageNet classifier is reported, not loaded
        self.assertTrue(torch.all(enc.backbone.conv1.conv.weight == 0.125))
        torch.testing.assert_close(enc.backbone.inception4a.branch1.conv.weight, sd["inception4a.branch1.conv.weight"])

    def test_densenet_torchvision_names_and_shape_mismatch(self):
        from torchvision.models import densenet121

        sd = densenet121(weights=None).state_dict()
        key = "features.denseblock1.denselayer1.conv1.weight"
        sd[key] = torch.full_like(sd[key], -0.5)
        sd["features.conv0.weight"] = torch.zeros(8, 3, 3, 3)  # wrong shape: skipped with a log line
        path = self.dir / "densenet.pt"
        torch.save(sd, path)
        with self.assertLogs("monai_wsi_ext.model.networks", level="WARNING") as logs:
            enc = PatchEncoder("densenet121", pretrained_path=path)
        text = "\n".join(logs.output)
        self.assertIn("skipping features.conv0.weight", text)
        self.assertIn("classifier.weight", text)
        loaded = enc.backbone.features.denseblock1.denselayer1.layers.conv1.weight
        self.assertTrue(torch.all(loaded == -0.5))
        self.assertEqual(tuple(enc.backbone.features.conv0.weight.shape), (64, 3, 7, 7))

    def test_full_encoder_checkpoint(self):
        torch.manual_seed(1)
        src = PatchEncoder("googlenet", feature_dim=8)
        with torch.no_grad():
            src.feature.weight.fill_(0.25)
            src.head.weight.fill_(2.0)
        path = self.dir / "encoder.pt"
        torch.save({"network": src.state_dict(), "epoch": torch.tensor(3)}, path)
        dst = PatchEncoder("googlenet", feature_dim=8, pretrained_path=path)
        self.assertTrue(torch.all(dst.feature.weight == 0.25) and torch.all(dst.head.weight == 2.0))
        fresh = PatchEncoder("googlenet", feature_dim=8)
        head_before = fresh.head.weight.clone()
        report = load_encoder_checkpoint(fresh, path, drop_head=True)
        self.assertTrue(torch.all(fresh.feature.weight == 0.25))
        self.assertTrue(torch.equal(fresh.head.weight, head_before))
        self.assertEqual(report.missing, [])
        self.assertNotIn("head.weight", report.loaded)

    def test_pickled_object_refused(self):
        path = self.dir / "evil.pt"
        torch.save({"state_dict": _NotATensor()}, path)
        with self.assertRaisesRegex(ConfigError, "weights-only"):
            read_state_dict(path)
        with self.assertRaisesRegex(ConfigError, "weights-only"):
            PatchEncoder("googlenet", pretrained_path=path)

    def test_missing_file_and_no_match(self):
        with self.assertRaisesRegex(ConfigError, "does not exist"):
            PatchEncoder("googlenet", pretrained_path=self.dir / "nope.pt")
        path = self.dir / "other.pt"
        torch.save({"foo.weight": torch.zeros(3)}, path)
        with self.assertRaisesRegex(ConfigError, "match"):
            PatchEncoder("googlenet", pretrained_path=path)


class TestUNet(unittest.TestCase):
    def test_make_unet_and_loss(self):
        unet = make_unet(feature_dim=16, num_classes=2, channels=(8, 16, 32, 64), num_res_units=1).eval()
        with torch.no_grad():
            out = unet(torch.randn(1, 16, 32, 32))
        self.assertEqual(tuple(out.shape), (1, 2, 32, 32))
        loss_fn = canvas_loss()
        self.assertEqual(loss_fn.ignore_index, IGNORE_INDEX)
        logits = torch.tensor([[[[0.0, 5.0]], [[0.0, -5.0]]]])  # (1, 2, 1, 2)
        target = torch.tensor([[[1, IGNORE_INDEX]]])
        torch.testing.assert_close(loss_fn(logits, target), torch.log(torch.tensor(2.0)))
        with self.assertRaisesRegex(ConfigError, "strides"):
            make_unet(channels=(8, 16), strides=(2, 2))


if __name__ == "__main__":
    unittest.main()
