"""Runtimes of the networks (monai_wsi_ext.runtime): ONNX export checked against eager on real patches, ONNX Runtime
in the slide pipeline and the exported-model path, calibrated int8 with its report, and clear errors for runtimes
that are not installed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from monai_wsi_ext.errors import ConfigError  # noqa: E402
from monai_wsi_ext.model.networks import PatchEncoder, bundle_unet  # noqa: E402
from monai_wsi_ext.runtime import RuntimeNetwork, resolve_runtime, runtime_network  # noqa: E402
from monai_wsi_ext.runtime import backends  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
# the deploy tests' tiling: 64 px cells, 56 px centre crop, 32-cell canvas
SETTINGS = {"patch_size": 64, "crop_size": 56, "canvas_size": 32}


def _real_patches(shared_data: Path, crop: int = 56) -> torch.Tensor:
    """The 16 real CRC patches (224 px), centre-cropped as the deploy tiling crops its 64 px cells."""
    from PIL import Image

    from monai_wsi_ext.data.patches import make_patch_transform

    tf = make_patch_transform(False, crop)
    files = sorted((shared_data / "patches" / "crc").glob("*.png"))
    assert len(files) >= 8, files
    return torch.stack([tf(np.asarray(Image.open(f).convert("RGB"))) for f in files])


def _trained_like_encoder(patches: torch.Tensor) -> PatchEncoder:
    """A GoogLeNet encoder whose activations carry the input (He-initialised convolutions, batch-norm statistics
    taken from the real patches): torchvision's random initialisation gives the same features for every patch,
    which would make an eager-vs-runtime comparison meaningless."""
    torch.manual_seed(0)
    enc = PatchEncoder("googlenet", 16, 2)
    for m in enc.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the pass below
    enc.train()
    with torch.no_grad():
        enc(patches)
    return enc.eval()


def _slide_patches(prepared_dir: Path, split: str, n: int) -> torch.Tensor:
    from monai_wsi_ext.data.patches import make_patch_transform
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.runtime.int8 import calibration_patches

    slides = load_prepared_slides(prepared_dir, split)
    return calibration_patches(slides, n, make_patch_transform(False, SETTINGS["crop_size"]), seed=1)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_data, prepared_dataset):
    """Checkpoints of an input-sensitive encoder (batch-norm statistics from the real patches and the synthetic
    training slides) and a U-Net, exported to ONNX with scripts/export_bundle.py's function (the deploy tests'
    tiling), plus the real patches."""
    from monai_wsi_ext.export.bundle import export_onnx_network

    root = tmp_path_factory.mktemp("runtime")
    patches = _real_patches(shared_data)
    enc = _trained_like_encoder(torch.cat([patches, _slide_patches(prepared_dataset[0], "training", 48)]))
    torch.manual_seed(1)
    unet = bundle_unet([str(CONFIGS / "common.json")])
    ckpt, out = root / "ckpt", root / "models"
    ckpt.mkdir()
    torch.save(enc.state_dict(), ckpt / "encoder.pt")
    torch.save(unet.state_dict(), ckpt / "unet.pt")
    for name in ("encoder", "unet"):
        export_onnx_network(name, ckpt / f"{name}.pt", out / f"{name}.onnx", bundle_root=BUNDLE, **SETTINGS)
    return {"root": root, "ckpt": ckpt, "models": out, "encoder": enc, "unet": unet.eval(), "patches": patches}


def test_onnx_encoder_matches_eager_on_real_patches(models):
    enc, x = models["encoder"], models["patches"]
    net = RuntimeNetwork(None, "encoder", "onnxruntime", model_file=models["models"] / "encoder.onnx")
    with torch.no_grad():
        want_f = enc.features(x)
        want_l = enc(x)
    got_f, got_l = net.features_and_logits(x)
    assert want_f.std(0).min() > 1e-3, "the encoder must tell the patches apart for the comparison to mean anything"
    assert (got_f - want_f).abs().max() <= 1e-4 * max(1.0, float(want_f.abs().max()))
    assert (got_l - want_l).abs().max() <= 1e-4 * max(1.0, float(want_l.abs().max()))
    # the settings export_bundle resolved travel in the model
    assert net.settings["patch_size"] == 64 and net.settings["crop_size"] == 56 and net.settings["canvas_size"] == 32
    assert net.feature_dim == 16 and not net.accepts_channels_last


def test_onnx_unet_matches_eager_on_real_features(models):
    """The U-Net graph takes any canvas size: the training size and a sliding-window layout, on canvases of the
    real patches' features."""
    from monai_wsi_ext.model.predict import canvas_probabilities

    with torch.no_grad():
        feats = models["encoder"].features(models["patches"]).numpy()
    rng = np.random.default_rng(0)
    n = 200
    f = feats[rng.integers(0, len(feats), n)] + rng.normal(0, 0.01, (n, 16)).astype(np.float32)
    rows, cols = rng.integers(0, 48, n), rng.integers(0, 40, n)  # larger than the 32-cell canvas: sliding window
    onnx_unet = RuntimeNetwork(None, "unet", "onnxruntime", model_file=models["models"] / "unet.onnx")
    want = canvas_probabilities(models["unet"], f, rows, cols, 32)
    got = canvas_probabilities(onnx_unet, f, rows, cols, 32)
    assert np.abs(got - want).max() <= 1e-5
    canvas = torch.from_numpy(rng.normal(0, 0.05, (2, 16, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert (onnx_unet(canvas) - models["unet"](canvas)).abs().max() <= 1e-4


def test_runtime_network_reexports_when_weights_change(models):
    """The config path wraps the eager network before its checkpoint is loaded: the ONNX session follows the
    weights (exported again after load_state_dict)."""
    from monai_wsi_ext.model.networks import make_unet

    torch.manual_seed(2)
    small = make_unet(4, 2, channels=(4, 8), strides=(2,))
    net = RuntimeNetwork(small, "unet", "onnxruntime", dynamo=False)  # the fast (TorchScript-based) exporter here

    x = torch.rand(1, 4, 16, 16)
    with torch.no_grad():
        assert (net(x) - small.eval()(x)).abs().max() <= 1e-5
        torch.manual_seed(3)
        other = make_unet(4, 2, channels=(4, 8), strides=(2,))
        small.load_state_dict(other.state_dict())
        assert (net(x) - other.eval()(x)).abs().max() <= 1e-5
    # the default (torch, fp32) is the module itself
    assert runtime_network(small, "unet") is small


def test_exported_onnx_folder_runs_through_run_exported_inference(models, tmp_path):
    """deploy.models with the ONNX models gives the heatmap of the eager networks (to float32 rounding)."""
    from monai_wsi_ext.deploy.models import find_model_files, load_exported_models, run_exported_inference
    from monai_wsi_ext.inference.slides import SlideInference
    from monai_wsi_ext.testing.synthetic import generate_dataset

    manifest = generate_dataset(tmp_path / "data", n_train=0, n_val=0, n_test=1, seed=5, width=1024, height=1024,
                                patch_size=64, n_lumps=2)
    slide = Path(manifest).parent / "slides" / "test_000.tif"
    shutil.copy(models["ckpt"] / "encoder.pt", tmp_path / "encoder.pt")
    (tmp_path / "models").mkdir()
    for f in ("encoder.onnx", "unet.onnx"):
        shutil.copy(models["models"] / f, tmp_path / "models" / f)
    torch.save(models["encoder"].state_dict(), tmp_path / "models" / "encoder.ts")  # a stray legacy name: ONNX wins
    assert {k: v.name for k, v in find_model_files(tmp_path / "models").items()} == \
        {"encoder": "encoder.onnx", "unet": "unet.onnx"}
    loaded = load_exported_models(tmp_path / "models", runtime="onnxruntime")
    assert isinstance(loaded.encoder, RuntimeNetwork) and loaded.encoder.runtime == "onnxruntime"
    summary = run_exported_inference(slide, tmp_path / "onnx_out", loaded, batch_size=16)
    assert summary["failed"] == {}
    got = np.load(tmp_path / "onnx_out" / "test_000" / "test_000_prob.npy")
    eager = SlideInference(str(tmp_path / "eager_out"), PatchEncoder("googlenet", 16, 2),
                           bundle_unet([str(CONFIGS / "common.json")]),
                           encoder_checkpoint=str(models["ckpt"] / "encoder.pt"),
                           unet_checkpoint=str(models["ckpt"] / "unet.pt"), slides=slide,
                           prepare={"patch_size": 64}, canvas_size=32, crop_size=56, device="cpu", batch_size=16)
    eager.run()
    want = np.load(tmp_path / "eager_out" / "test_000" / "test_000_prob.npy")
    tissue = np.isfinite(want)
    assert tissue.sum() > 50 and np.array_equal(tissue, np.isfinite(got))
    # eager runs NHWC (channels_last) convolutions, ONNX Runtime its own NCHW kernels: float32 rounding only (up to
    # about 1e-4 seen with this untrained encoder's large activations; 2.8e-5 in BENCHMARKS.md's run)
    assert np.abs(got[tissue] - want[tissue]).max() <= 5e-4
    record = json.loads((tmp_path / "onnx_out" / "test_000" / "test_000_record.json").read_text())
    assert "encoder.onnx" in json.dumps(record) and "onnxruntime" in json.dumps(record)


def test_exported_prob_channel_unet_runs_with_its_extra_channel(models, tmp_path):
    """A U-Net trained with ``canvas_prob_channel: true`` (17 input channels) exports that setting, and the exported
    path appends the encoder head's probability as the bundle's inference does (it used to pass 16 channels and
    fail every slide)."""
    from monai_wsi_ext.deploy.models import load_exported_models, run_exported_inference
    from monai_wsi_ext.export.bundle import export_onnx_network
    from monai_wsi_ext.inference.slides import SlideInference
    from monai_wsi_ext.testing.synthetic import generate_dataset

    manifest = generate_dataset(tmp_path / "data", n_train=0, n_val=0, n_test=1, seed=5, width=768, height=768,
                                patch_size=64, n_lumps=1)
    slide = Path(manifest).parent / "slides" / "test_000.tif"
    torch.manual_seed(2)
    unet = bundle_unet([str(CONFIGS / "common.json")], canvas_prob_channel=True)
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    out = tmp_path / "models"
    export_onnx_network("encoder", models["ckpt"] / "encoder.pt", out / "encoder.onnx", bundle_root=BUNDLE,
                        canvas_prob_channel=True, **SETTINGS)
    export_onnx_network("unet", tmp_path / "unet.pt", out / "unet.onnx", bundle_root=BUNDLE, canvas_prob_channel=True,
                        **SETTINGS)
    loaded = load_exported_models(out, runtime="onnxruntime")
    assert loaded.settings["canvas_prob_channel"] is True
    summary = run_exported_inference(slide, tmp_path / "onnx_out", loaded, batch_size=16)
    assert summary["failed"] == {}
    got = np.load(tmp_path / "onnx_out" / "test_000" / "test_000_prob.npy")
    eager = SlideInference(str(tmp_path / "eager_out"), PatchEncoder("googlenet", 16, 2),
                           bundle_unet([str(CONFIGS / "common.json")], canvas_prob_channel=True),
                           encoder_checkpoint=str(models["ckpt"] / "encoder.pt"),
                           unet_checkpoint=str(tmp_path / "unet.pt"), slides=slide, prepare={"patch_size": 64},
                           canvas_size=32, crop_size=56, device="cpu", batch_size=16, prob_channel=True)
    assert eager.run()["failed"] == {}
    want = np.load(tmp_path / "eager_out" / "test_000" / "test_000_prob.npy")
    tissue = np.isfinite(want)
    assert tissue.sum() > 10 and np.array_equal(tissue, np.isfinite(got))
    assert np.abs(got[tissue] - want[tissue]).max() <= 5e-4


def test_inference_config_declares_the_runtime(models, tmp_path):
    """inference.json's runtime_encoder/runtime_network follow `runtime` and `precision`."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")])
    parser.update({"device": "cpu", **SETTINGS})
    assert parser.get_parsed_content("runtime_encoder") is parser.get_parsed_content("encoder")  # default: torch
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")])
    parser.update({"device": "cpu", "runtime": "auto", **SETTINGS})
    enc = parser.get_parsed_content("runtime_encoder")
    unet = parser.get_parsed_content("runtime_network")
    assert isinstance(enc, RuntimeNetwork) and enc.runtime == resolve_runtime("auto") != "torch"
    assert isinstance(unet, RuntimeNetwork) and unet.network == "unet"


def _hide(monkeypatch, *modules):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in modules:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backends.importlib, "import_module", fake)


def test_a_runtime_that_is_not_installed_names_its_extra(monkeypatch):
    from monai.bundle import ConfigParser

    _hide(monkeypatch, "onnxruntime", "openvino")
    with pytest.raises(ConfigError, match=r"pip install monai-wsi-canvas\[onnx\]"):
        runtime_network(torch.nn.Linear(2, 2), "encoder", "onnxruntime")
    with pytest.raises(ConfigError, match=r"pip install monai-wsi-canvas\[openvino\]"):
        resolve_runtime("openvino")
    assert resolve_runtime("auto") == "torch"  # the default install runs everything with torch alone
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")])
    parser.update({"device": "cpu", "runtime": "onnxruntime", **SETTINGS})
    with pytest.raises(Exception) as info:  # MONAI wraps it; `monai.bundle run` prints the ConfigError's line
        parser.get_parsed_content("runtime_encoder")
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(c, ConfigError) and "monai-wsi-canvas[onnx]" in str(c) for c in chain), chain
    with pytest.raises(ConfigError, match="`runtime` must be one of"):
        resolve_runtime("tensorflow")
    with pytest.raises(ConfigError, match="`precision` must be one of"):
        resolve_runtime("torch", "fp16")


def test_int8_needs_a_calibrated_model_and_its_report(models, tmp_path):
    from monai_wsi_ext.runtime.int8 import quantize_encoder, report_path

    with pytest.raises(ConfigError, match="calibrated int8 ONNX model"):
        runtime_network(models["encoder"], "encoder", "onnxruntime", "int8")
    q = quantize_encoder(models["models"] / "encoder.onnx", models["patches"][:8], tmp_path / "encoder.int8.onnx")
    with pytest.raises(ConfigError, match="without its calibration report"):
        RuntimeNetwork(None, "encoder", "onnxruntime", "int8", q)
    report_path(q).write_text(json.dumps({"kind": "monai_wsi_canvas.int8_calibration", "model_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="report is for another model"):
        RuntimeNetwork(None, "encoder", "onnxruntime", "int8", q)
    with pytest.raises(ConfigError, match="is fp32"):
        RuntimeNetwork(None, "encoder", "onnxruntime", "int8", models["models"] / "encoder.onnx")


def test_calibrate_int8_writes_a_model_within_its_reported_bound(models, tmp_path, prepared_dataset):
    """Calibration on the training slides, report on the held-out one: the report holds what the int8 encoder
    does there (recomputed here), and the int8 encoder then loads (its report found)."""
    from monai_wsi_ext.runtime.int8 import calibrate_int8, check_calibration_report

    prepared, _ = prepared_dataset
    model_dir = tmp_path / "models"
    shutil.copytree(models["models"], model_dir)
    report = calibrate_int8(model_dir, prepared, calibration_split="training", heldout_split="validation",
                            n_patches=32)
    assert report == check_calibration_report(model_dir / "encoder.int8.onnx")
    assert report["calibration"]["n_patches"] == 32 and report["heldout"]["n_patches"] > 50
    for key in ("max_abs_prob_change", "mean_abs_prob_change", "fraction_calls_changed", "pr_auc_fp32",
                "pr_auc_int8", "pr_auc_change", "max_abs_feature_change"):
        assert key in report and report[key] == report[key] or key.startswith("pr_auc"), key
    assert 0 <= report["mean_abs_prob_change"] <= report["max_abs_prob_change"] <= 1
    assert 0 <= report["fraction_calls_changed"] <= 1
    int8 = RuntimeNetwork(None, "encoder", "onnxruntime", "int8", model_dir / "encoder.int8.onnx")
    assert int8.precision == "int8"
    fp32 = RuntimeNetwork(None, "encoder", "onnxruntime", model_file=model_dir / "encoder.onnx")
    # the report is what the held-out slide gives: recompute its feature change here
    from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform
    from monai_wsi_ext.model.predict import encode_slide
    from monai_wsi_ext.prep.prepare import load_prepared_slides

    held = load_prepared_slides(prepared, "validation")[0]
    feats = {}
    for name, net in (("fp32", fp32), ("int8", int8)):
        source = SlidePatchSource.from_prepared(held, make_patch_transform(False, SETTINGS["crop_size"]))
        try:
            feats[name] = encode_slide(net, source, 16, channels_last=False)[0]
        finally:
            source.close()
    change = float(np.abs(feats["int8"] - feats["fp32"]).max())
    assert change == pytest.approx(report["max_abs_feature_change"], rel=1e-6)
    rel = float(np.abs(feats["int8"] - feats["fp32"]).mean() / np.abs(feats["fp32"]).mean())
    # quantised, and correlated with fp32. This untrained encoder quantises far worse (mean relative feature change
    # about 0.5) than a trained one: the demo's trained GoogLeNet gave 0.036, and 1 of 1629 held-out calls changed
    # (bundle/docs/runtimes.md); what the bundle guarantees is that the report states what the int8 model does.
    assert 0 < change and rel < 1.0
    corr = np.corrcoef(feats["int8"].ravel(), feats["fp32"].ravel())[0, 1]
    assert corr > 0.5, corr


def test_export_refuses_bad_paths(models, tmp_path):
    from monai_wsi_ext.export.bundle import export_onnx_network

    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_onnx_network("unet", models["ckpt"] / "unet.pt", tmp_path / "unet.ts", bundle_root=BUNDLE)
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx_network("unet", tmp_path / "none.pt", tmp_path / "unet.onnx", bundle_root=BUNDLE)
    with pytest.raises(ConfigError, match="not an ONNX model"):
        (tmp_path / "bad.onnx").write_bytes(b"not a model")
        RuntimeNetwork(None, "unet", "onnxruntime", model_file=tmp_path / "bad.onnx")
    with pytest.raises(ConfigError, match="model of the unet, given as the encoder"):
        RuntimeNetwork(None, "encoder", "onnxruntime", model_file=models["models"] / "unet.onnx")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed (`.[openvino]`)")
def test_openvino_runs_the_exported_models_like_eager(models):
    x = models["patches"]
    enc = RuntimeNetwork(None, "encoder", "openvino", model_file=models["models"] / "encoder.onnx")
    unet = RuntimeNetwork(None, "unet", "openvino", model_file=models["models"] / "unet.onnx")
    with torch.no_grad():
        f, logits = enc.features_and_logits(x)
        assert (f - models["encoder"].features(x)).abs().max() <= 1e-4 * max(1.0, float(f.abs().max()))
        canvas = torch.rand(1, 16, 64, 48, generator=torch.Generator().manual_seed(0)) * 0.1
        assert (unet(canvas) - models["unet"](canvas)).abs().max() <= 1e-4


def test_inference_config_runs_on_onnxruntime(models, tmp_path, prepared_dataset):
    """inference.json with `--runtime onnxruntime`: the checkpoints are loaded into the eager networks when the run
    starts, the runtime networks export them then, and the heatmap is the eager run's (to float32 rounding)."""
    from monai.bundle import ConfigWorkflow

    ckpt = tmp_path / "models"
    ckpt.mkdir()
    shutil.copy(models["ckpt"] / "encoder.pt", ckpt / "encoder.pt")
    torch.save(bundle_unet([str(CONFIGS / "common.json")]).state_dict(), ckpt / "unet.pt")
    probs = {}
    for runtime in ("torch", "onnxruntime"):
        overrides = {"dataset_dir": str(prepared_dataset[0]), "split": "validation", "ckpt_dir": str(ckpt),
                     "output_dir": str(tmp_path / runtime), "num_workers": 0, "device": "cpu", "runtime": runtime}
        wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "inference.json"),
                                         str(REPO / "configs" / "datasets" / "demo.json")],
                            workflow_type=None, **overrides)
        wf.initialize()
        assert wf.parser.get_parsed_content("batch_size") == 16  # the CPU default
        wf.run()
        probs[runtime] = np.load(tmp_path / runtime / "heatmaps" / "val_000" / "val_000_prob.npy")
    enc = wf.parser.get_parsed_content("runtime_encoder")
    assert isinstance(enc, RuntimeNetwork) and enc.runtime == "onnxruntime" and enc._session is not None
    tissue = np.isfinite(probs["torch"])
    assert tissue.sum() > 20 and np.array_equal(tissue, np.isfinite(probs["onnxruntime"]))
    assert np.abs(probs["onnxruntime"][tissue] - probs["torch"][tissue]).max() <= 5e-4  # float32 rounding, as above
    # the loaded checkpoint, not the random initialisation, went into the ONNX model
    assert np.abs(probs["torch"][tissue] - probs["torch"][tissue].mean()).max() > 1e-4
