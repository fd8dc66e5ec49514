"""Exported TorchScript models -> heatmaps (``monai_wsi_ext.deploy.models``), and the MONAI Deploy application when
the App SDK is installed (``pip install -e ".[deploy]"``; not part of the test install, see the README)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.export.bundle import export_network
from monai_wsi_ext.deploy import find_model_files, list_slides, load_exported_models, run_exported_inference
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.model.networks import PatchEncoder

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
# the demo's tiling, given at export time as overrides (so they must come back from the embedded settings)
SETTINGS = {"patch_size": 64, "crop_size": 56, "canvas_size": 32}
HAS_DEPLOY = importlib.util.find_spec("monai.deploy") is not None


def _unet():
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=16, out_channels=2, channels=[32, 64, 128, 256], strides=[2, 2, 2],
                num_res_units=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Random-weight checkpoints exported with the demo's tiling, plus one slide to run them on."""
    from monai_wsi_ext.testing.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(PatchEncoder(backbone="googlenet", feature_dim=16).state_dict(), ckpt / "encoder.pt")
    torch.save(_unet().state_dict(), ckpt / "unet.pt")
    models = root / "models"
    for name in ("encoder", "unet"):
        export_network(name, ckpt / f"{name}.pt", models / f"{name}.ts", bundle_root=BUNDLE, **SETTINGS)
    manifest = generate_dataset(root / "data", n_train=0, n_val=0, n_test=1, seed=5, width=1024, height=1024,
                                patch_size=64, n_lumps=2)
    slides = root / "slides"
    slides.mkdir()
    (slides / "s1.tif").symlink_to(Path(manifest).parent / "slides" / "test_000.tif")
    return {"root": root, "ckpt": ckpt, "models": models, "slides": slides}


def test_find_model_files_in_both_layouts(exported, tmp_path):
    flat = find_model_files(exported["models"])
    assert {k: v.name for k, v in flat.items()} == {"encoder": "encoder.ts", "unet": "unet.ts"}
    named = tmp_path / "named"
    for name in ("encoder", "unet"):  # MONAI Deploy's named-model repository: <name>/<one file>
        (named / name).mkdir(parents=True)
        shutil.copy(exported["models"] / f"{name}.ts", named / name / "model.ts")
    assert {k: v.parent.name for k, v in find_model_files(named).items()} == {"encoder": "encoder", "unet": "unet"}
    # separate and end-to-end exports side by side: ambiguous unless a suffix is chosen
    both = tmp_path / "both"
    both.mkdir()
    for f in ("encoder.ts", "encoder_e2e.ts", "unet.ts", "unet_e2e.ts"):
        shutil.copy(exported["models"] / f.replace("_e2e", ""), both / f)
    with pytest.raises(ConfigError, match="several encoder models"):
        find_model_files(both)
    assert find_model_files(both, suffix="_e2e")["unet"].name == "unet_e2e.ts"
    shutil.copy(exported["models"] / "unet.ts", named / "unet" / "other.ts")
    with pytest.raises(ConfigError, match="exactly one model file"):
        find_model_files(named)
    with pytest.raises(ConfigError, match="no encoder model"):
        find_model_files(tmp_path / "both" / ".." / "named" / "unet")


def test_load_exported_models_reads_embedded_settings(exported, tmp_path):
    models = load_exported_models(exported["models"])
    assert isinstance(models.encoder, torch.jit.ScriptModule) and isinstance(models.unet, torch.jit.ScriptModule)
    assert {k: models.settings[k] for k in SETTINGS} == SETTINGS
    assert models.settings["feature_dim"] == 16 and models.settings["backbone"] == "googlenet"
    # a U-Net exported for another tiling does not pair with this encoder
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(exported["models"] / "encoder.ts", mixed / "encoder.ts")
    export_network("unet", exported["ckpt"] / "unet.pt", mixed / "unet.ts", bundle_root=BUNDLE, check_shape=(),
                   **{**SETTINGS, "canvas_size": 64})
    with pytest.raises(ConfigError, match="canvas_size"):
        load_exported_models(mixed)


def test_exported_models_give_the_eager_heatmap(exported, tmp_path):
    """TorchScript models with their embedded settings give the same probabilities as the bundle's eager path
    (the same checkpoints through ``SlideInference`` with the settings passed by hand)."""
    from monai_wsi_ext.inference.slides import SlideInference

    torch.set_num_threads(2)
    models = load_exported_models(exported["models"])
    out_ts = tmp_path / "ts"
    summary = run_exported_inference(exported["slides"], out_ts, models, device="cpu", itk_format="nrrd")
    assert list(summary["slides"]) == ["s1"] and not summary["failed"]

    torch.manual_seed(1)  # different initial weights: the checkpoints must be what counts
    eager = SlideInference(
        output_dir=str(tmp_path / "eager"), encoder=PatchEncoder(backbone="googlenet", feature_dim=16),
        unet=_unet(), encoder_checkpoint=str(exported["ckpt"] / "encoder.pt"),
        unet_checkpoint=str(exported["ckpt"] / "unet.pt"), slides=str(exported["slides"]),
        prepare={"patch_size": 64}, canvas_size=32, crop_size=56, device="cpu")
    eager.run()
    got = np.load(out_ts / "s1" / "s1_prob.npy")
    want = np.load(tmp_path / "eager" / "s1" / "s1_prob.npy")
    tissue = ~np.isnan(want)
    assert tissue.sum() > 50 and np.array_equal(np.isnan(got), ~tissue)
    np.testing.assert_allclose(got[tissue], want[tissue], atol=1e-4)
    assert float(np.nanstd(got)) > 1e-4  # a real map, not a constant
    record = json.loads((out_ts / "s1" / "s1_record.json").read_text())
    assert set(record["weights"]) == {"encoder", "unet"}
    assert all(len(w["sha256"]) == 64 for w in record["weights"].values())
    for suffix in ("_heatmap.tif", "_overlay.png", "_tumor.geojson"):
        assert (out_ts / "s1" / f"s1{suffix}").is_file()
    itk = pytest.importorskip("itk")  # the map as an ITK image: same values, spacing from the slide's mpp
    image = itk.imread(str(out_ts / "s1" / "s1_prob.nrrd"))
    np.testing.assert_array_equal(itk.array_from_image(image), got)
    assert itk.spacing(image)[0] == pytest.approx(64 * record["mpp"] / 1000)
    with pytest.raises(ConfigError, match="itk_format"):
        run_exported_inference(exported["slides"], tmp_path / "bad", models, device="cpu", itk_format="png")


def test_exported_inference_reports_a_bad_slide_and_goes_on(exported, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "good.tif").symlink_to(exported["slides"] / "s1.tif")
    (slides / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    models = load_exported_models(exported["models"])
    with pytest.raises(MonaiWsiExtError, match="1 slide"):
        run_exported_inference(slides, tmp_path / "out", models, mode="classifier", device="cpu")
    summary = json.loads((tmp_path / "out" / "inference_summary.json").read_text())
    assert list(summary["slides"]) == ["good"] and "broken.tif" in summary["failed"]["broken"]
    assert summary["mode"] == "classifier"


def test_list_slides(exported, tmp_path):
    assert list_slides(exported["slides"]) == [str(exported["slides"] / "s1.tif")]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no slides found"):
        list_slides(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        list_slides(tmp_path / "missing")


@pytest.mark.skipif(not HAS_DEPLOY and not os.environ.get("REQUIRE_MONAI_DEPLOY"),
                    reason="MONAI Deploy App SDK not installed (`make test-deploy` runs this test)")
def test_deploy_application_end_to_end(exported, tmp_path):
    """``python -m monai_wsi_ext.deploy -i -o -m`` writes the heatmaps; a broken slide makes the exit status fail
    while the good slide's outputs are still written. ``make test-deploy`` sets ``REQUIRE_MONAI_DEPLOY`` so that a
    missing SDK fails there instead of skipping."""
    assert HAS_DEPLOY, "REQUIRE_MONAI_DEPLOY is set but monai.deploy does not import"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WSI_CANVAS_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "monai_wsi_ext.deploy", "-m", str(exported["models"])]
    ok = subprocess.run([*cmd, "-i", str(exported["slides"]), "-o", str(tmp_path / "out")], capture_output=True,
                        text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out" / "s1" / "s1_prob.npy").is_file()
    assert json.loads((tmp_path / "out" / "inference_summary.json").read_text())["mode"] == "canvas"

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "good.tif").symlink_to(exported["slides"] / "s1.tif")
    (slides / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    bad = subprocess.run([*cmd, "-i", str(slides), "-o", str(tmp_path / "out2")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode != 0
    summary = json.loads((tmp_path / "out2" / "inference_summary.json").read_text())
    assert list(summary["slides"]) == ["good"] and "broken" in summary["failed"]


@pytest.mark.skipif(not HAS_DEPLOY and not os.environ.get("REQUIRE_MONAI_DEPLOY"),
                    reason="MONAI Deploy App SDK not installed (make test-deploy runs this)")
def test_application_batch_size_follows_the_device_unless_set():
    """Without WSI_CANVAS_BATCH_SIZE the application leaves the batch to run_exported_inference (16 on the CPU,
    64 on a GPU, as inference.json); a set value is used as given."""
    from monai_wsi_ext.deploy.app import settings_from_env

    assert settings_from_env({})["batch_size"] is None
    assert settings_from_env({"WSI_CANVAS_BATCH_SIZE": "32"})["batch_size"] == 32
