"""Tests of the bundle's metadata (offline schema check), logging.conf, LICENSE and TorchScript export."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import logging.config
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from parameterized import parameterized

from monai_wsi_ext.export.bundle import (
    SCHEMA_FILE,
    bundle_config_files,
    check_exported,
    export_network,
    read_embedded_settings,
    verify_bundle_metadata,
)
from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.networks import PatchEncoder

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
META_FILE = BUNDLE / "configs" / "metadata.json"


def _unet(feature_dim: int = 16) -> torch.nn.Module:
    """The U-Net exactly as ``common.json``'s ``unet_def`` builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_config_files("unet", BUNDLE))
    parser["feature_dim"] = feature_dim
    return parser.get_parsed_content("unet_def")


class TestMetadata(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.meta = json.loads(META_FILE.read_text())

    def tearDown(self):
        self.tmp.cleanup()

    def _write(self, meta: dict) -> Path:
        path = self.dir / "metadata.json"
        path.write_text(json.dumps(meta))
        return path

    def test_shipped_metadata_validates_offline(self):
        meta = verify_bundle_metadata(META_FILE)
        self.assertEqual(meta["version"], "0.1.0")
        self.assertEqual(meta["name"], "monai-wsi-canvas")
        self.assertIn("not for diagnosis", meta["intended_use"])

    def test_metadata_matches_configs(self):
        common = json.loads((BUNDLE / "configs" / "common.json").read_text())
        image = self.meta["network_data_format"]["inputs"]["image"]
        pred = self.meta["network_data_format"]["outputs"]["pred"]
        self.assertEqual(image["num_channels"], common["feature_dim"])
        self.assertEqual(image["spatial_shape"], [common["canvas_size"]] * 2)
        self.assertEqual(len(image["channel_def"]), common["feature_dim"])
        self.assertEqual(pred["num_channels"], common["unet_def"]["out_channels"])
        self.assertEqual(pred["channel_def"], {"0": "normal", "1": "tumor"})
        enc = self.meta["encoder_network_data_format"]
        self.assertEqual(enc["inputs"]["image"]["spatial_shape"], [common["crop_size"]] * 2)
        self.assertEqual(enc["outputs"]["features"]["num_channels"], common["feature_dim"])
        self.assertEqual(self.meta["monai_version"], __import__("monai").__version__)
        self.assertEqual(self.meta["pytorch_version"], torch.__version__.split("+")[0])

    def test_monai_verify_metadata_with_local_schema(self):
        """MONAI skips the download when ``filepath`` exists (and its md5 matches ``hash_val``)."""
        from monai.bundle import verify_metadata

        md5 = hashlib.md5(SCHEMA_FILE.read_bytes()).hexdigest()
        verify_metadata(meta_file=str(META_FILE), filepath=str(SCHEMA_FILE), hash_val=md5)
        meta = copy.deepcopy(self.meta)
        del meta["network_data_format"]["outputs"]["pred"]["num_channels"]
        with self.assertRaisesRegex(ValueError, "num_channels"):
            verify_metadata(meta_file=str(self._write(meta)), filepath=str(SCHEMA_FILE), hash_val=md5)

    @parameterized.expand(
        [
            ("missing_top_key", ("network_data_format",), None, "'network_data_format' is a required property"),
            ("missing_authors", ("authors",), None, "'authors' is a required property"),
            ("missing_num_channels", ("network_data_format", "inputs", "image", "num_channels"), None,
             "at `network_data_format/inputs/image`: 'num_channels' is a required property"),
            ("bad_version", ("version",), "0.1", "at `version`: '0.1' does not match"),
            ("bad_dtype", ("network_data_format", "outputs", "pred", "dtype"), "float", "outputs/pred/dtype"),
            ("bad_value_range", ("network_data_format", "inputs", "image", "value_range"), [0, 1, 2],
             "inputs/image/value_range"),
            ("no_changelog_entry", ("version",), "0.2.0", "no entry for the current version '0.2.0'"),
        ]
    )
    def test_broken_metadata_fails_clearly(self, _, key_path, value, message):
        meta = copy.deepcopy(self.meta)
        node = meta
        for k in key_path[:-1]:
            node = node[k]
        if value is None:
            del node[key_path[-1]]
        else:
            node[key_path[-1]] = value
        path = self._write(meta)
        with self.assertRaises(ConfigError) as ctx:
            verify_bundle_metadata(path)
        text = str(ctx.exception)
        self.assertIn(str(path), text)
        self.assertIn(str(SCHEMA_FILE), text)
        self.assertIn(message, text)

    def test_missing_and_invalid_files(self):
        with self.assertRaisesRegex(ConfigError, "does not exist"):
            verify_bundle_metadata(self.dir / "nope.json")
        bad = self.dir / "bad.json"
        bad.write_text("{not json")
        with self.assertRaisesRegex(ConfigError, "not valid JSON"):
            verify_bundle_metadata(bad)
        bad_schema = self.dir / "schema.json"
        bad_schema.write_text(json.dumps({"type": 5}))
        with self.assertRaisesRegex(ConfigError, "not a valid JSON schema"):
            verify_bundle_metadata(META_FILE, bad_schema)


class TestBundleFiles(unittest.TestCase):
    def test_logging_conf(self):
        path = BUNDLE / "configs" / "logging.conf"
        from monai.bundle import workflows

        validate = getattr(workflows, "_reject_executable_logging_config", None)  # MONAI's own check, if present
        if validate is not None:
            validate(str(path))
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        try:
            logging.config.fileConfig(str(path), disable_existing_loggers=False)
            self.assertEqual(root.level, logging.INFO)
            handler = next(h for h in root.handlers if h not in saved[1])
            self.assertIsInstance(handler, logging.StreamHandler)
            self.assertIs(handler.stream, sys.stdout)
            record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello", None, None)
            line = handler.formatter.format(record)
            self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - x - WARNING - hello$")
        finally:
            for h in list(root.handlers):
                if h not in saved[1]:
                    root.removeHandler(h)
            for h in saved[1]:
                if h not in root.handlers:
                    root.addHandler(h)
            root.setLevel(saved[0])

    def test_license(self):
        text = (BUNDLE / "LICENSE").read_text()
        self.assertIn("Apache License, Version 2.0", text)
        self.assertIn("http://www.apache.org/licenses/LICENSE-2.0", text)

    def test_unknown_network(self):
        with self.assertRaisesRegex(ConfigError, "`network` must be one of"):
            bundle_config_files("resnet", BUNDLE)


class TestExport(unittest.TestCase):
    """``ckpt_export`` of both networks from plain state-dict checkpoints, compared with the eager networks."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = Path(cls.tmp.name)
        torch.manual_seed(0)
        cls.unet = _unet().eval()
        torch.save(cls.unet.state_dict(), cls.dir / "unet.pt")
        cls.encoder = PatchEncoder(backbone="googlenet", feature_dim=16).eval()
        torch.save(cls.encoder.state_dict(), cls.dir / "encoder.pt")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_unet_export(self):
        from monai.data import load_net_with_metadata

        out = export_network("unet", self.dir / "unet.pt", self.dir / "out" / "unet.ts", bundle_root=BUNDLE)
        ts, meta, extra = load_net_with_metadata(str(out), more_extra_files=("common.json", "train_canvas.json"))
        self.assertEqual(meta["version"], "0.1.0")
        self.assertEqual(meta["network_data_format"]["inputs"]["image"]["num_channels"], 16)
        self.assertEqual(json.loads(extra["train_canvas.json"])["network_def"], "@unet_def")
        # the resolved settings travel with the module (ckpt_export's metadata and configs are kept above)
        self.assertEqual(read_embedded_settings(out), {
            "backbone": "googlenet", "feature_dim": 16, "patch_size": 256, "patch_level": 0, "crop_size": 224,
            "canvas_size": 512, "canvas_mode": "slide", "canvas_prob_channel": False, "stain_normalize": False,
            "prepare": {"patch_size": 256, "level": 0, "target_mpp": None, "mpp": None, "backend": "auto",
                        "tissue_threshold": 0.8, "tumor_threshold": 0.2, "normal_threshold": 0.8, "exhaustive": True,
                        "exclude_ink": True, "annotation_max_outside_fraction": 1.0, "clip_annotations": False,
                        "slide_timeout_s": None}})
        x = torch.rand(1, 16, 64, 64)
        with torch.no_grad():
            got, want = ts(x), self.unet(x)
        self.assertEqual(tuple(got.shape), (1, 2, 64, 64))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    def test_googlenet_encoder_export(self):
        out = export_network(
            "encoder", self.dir / "encoder.pt", self.dir / "encoder.ts", bundle_root=BUNDLE, check_shape=()
        )  # compared below
        ts = torch.jit.load(str(out))
        x = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            logits, feats = ts(x), ts.features(x)
            torch.testing.assert_close(logits, self.encoder(x), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(feats, self.encoder.features(x), atol=1e-5, rtol=1e-4)
        self.assertEqual(tuple(logits.shape), (2, 2))
        self.assertEqual(tuple(feats.shape), (2, 16))

    def test_export_overrides_are_embedded_resolved(self):
        """Overrides given at export time (not visible in the raw embedded configs) are in the embedded settings;
        a TorchScript file saved without them has none."""
        out = export_network("unet", self.dir / "unet.pt", self.dir / "unet_c.ts", bundle_root=BUNDLE,
                             canvas_size=128, patch_size=64, crop_size="$@patch_size - 8", check_shape=())
        got = read_embedded_settings(out)
        self.assertEqual((got["canvas_size"], got["patch_size"], got["crop_size"]), (128, 64, 56))
        plain = self.dir / "plain.ts"
        torch.jit.save(torch.jit.script(self.unet), str(plain))
        self.assertEqual(read_embedded_settings(plain), {})
        (self.dir / "not_ts.ts").write_bytes(b"not a zip")
        with self.assertRaisesRegex(ConfigError, "not a TorchScript file"):
            read_embedded_settings(self.dir / "not_ts.ts")

    def test_checkpoint_config_mismatch_fails(self):
        """A checkpoint trained with feature_dim 16 cannot be exported into a network built with feature_dim 8."""
        with self.assertRaisesRegex(RuntimeError, "size mismatch"):
            export_network("unet", self.dir / "unet.pt", self.dir / "bad.ts", bundle_root=BUNDLE, feature_dim=8)
        self.assertEqual(list(self.dir.glob("*bad.ts*")), [])  # no partial file left behind

    def test_missing_checkpoint(self):
        with self.assertRaisesRegex(ConfigError, "does not exist"):
            export_network("unet", self.dir / "none.pt", self.dir / "x.ts", bundle_root=BUNDLE)

    def test_check_exported_detects_a_different_network(self):
        from monai.networks.nets import UNet

        def tiny():
            return UNet(spatial_dims=2, in_channels=2, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)

        torch.manual_seed(1)
        exported, other = tiny().eval(), tiny().eval()
        path = self.dir / "tiny.ts"
        torch.jit.save(torch.jit.script(exported), str(path))
        check_exported(path, exported, (1, 2, 16, 16))
        with self.assertRaisesRegex(ConfigError, "TorchScript `forward` differs from the eager network"):
            check_exported(path, other, (1, 2, 16, 16))

    def test_export_script_skips_missing_checkpoints(self):
        """``scripts/export_bundle.py main``: verifies the metadata, exports what exists, skips what does not."""
        import importlib.util

        spec = importlib.util.spec_from_file_location("export_bundle", REPO_ROOT / "scripts" / "export_bundle.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ckpt_dir = self.dir / "models"
        ckpt_dir.mkdir()
        (ckpt_dir / "unet.pt").write_bytes((self.dir / "unet.pt").read_bytes())
        with self.assertLogs(module.logger, level="WARNING") as logs:
            written = module.main(str(ckpt_dir), output_dir=str(self.dir / "exported"), bundle_root=str(BUNDLE))
        self.assertIn("encoder.pt does not exist", "\n".join(logs.output))
        self.assertEqual(written, {"unet": str(self.dir / "exported" / "unet.onnx")})  # ONNX is the default format
        from monai_wsi_ext.runtime import RuntimeNetwork

        onnx_unet = RuntimeNetwork(None, "unet", "onnxruntime", model_file=written["unet"])
        self.assertEqual(tuple(onnx_unet(torch.rand(1, 16, 16, 16)).shape), (1, 2, 16, 16))
        legacy = module.main(str(ckpt_dir), output_dir=str(self.dir / "exported"), bundle_root=str(BUNDLE),
                             networks="unet", format="torchscript")
        self.assertEqual(tuple(torch.jit.load(legacy["unet"])(torch.rand(1, 16, 16, 16)).shape), (1, 2, 16, 16))
        with self.assertRaises(SystemExit):
            module.main(str(ckpt_dir), networks="encoder", bundle_root=str(BUNDLE))

    def test_monai_cli_unet(self):
        """The documented command line works verbatim (run from the repository root)."""
        out = self.dir / "cli_unet.ts"
        cmd = [
            sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
            "--filepath", str(out), "--ckpt_file", str(self.dir / "unet.pt"),
            "--meta_file", "bundle/configs/metadata.json",
            "--config_file", "['bundle/configs/common.json','bundle/configs/train_canvas.json']",
            "--bundle_root", "bundle",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        ts = torch.jit.load(str(out))
        x = torch.rand(1, 16, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ts(x), self.unet(x), atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    unittest.main()
