"""Every bundle config runs end to end on a tiny generated dataset, through MONAI's ConfigWorkflow (train configs
with ``check_properties``) and, for inference, through ``python -m monai.bundle run`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bundle_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
DEMO = str(REPO / "configs" / "datasets" / "demo.json")


_INFERENCE_CMD = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                  f"['{COMMON}','{CONFIGS / 'inference.json'}','{DEMO}']"]


def _workflow(config: str, workflow_type: str | None, **overrides):
    from monai.bundle import ConfigWorkflow

    meta = CONFIGS / "metadata.json"
    wf = ConfigWorkflow(
        config_file=[COMMON, str(CONFIGS / config), DEMO],
        meta_file=str(meta) if meta.exists() else None,
        logging_file=str(CONFIGS / "logging.conf") if (CONFIGS / "logging.conf").exists() else None,
        workflow_type=workflow_type,
        **overrides,
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_bundle_dataset(tmp_path_factory.mktemp("bundle"))


def test_train_encoder_config(tiny):
    torch.set_num_threads(2)
    wf = _workflow("train_encoder.json", "train", max_epochs=6, batch_size=16, learning_rate=1e-3,
                   **tiny["overrides"])
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    ckpt = Path(tiny["overrides"]["ckpt_dir"]) / "encoder.pt"
    assert ckpt.exists()
    sd = torch.load(ckpt, weights_only=True)
    assert "feature.weight" in sd and sd["feature.weight"].shape == (16, 1024)


def test_extract_features_config(tiny):
    wf = _workflow("extract_features.json", None, **tiny["overrides"])
    wf.run()
    feat_dir = Path(tiny["overrides"]["output_dir"]) / "features"
    files = sorted(feat_dir.glob("*.npz"))
    assert len(files) == 4
    z = np.load(files[0])
    assert z["features"].shape == (len(z["rows"]), 16) and np.isfinite(z["features"]).all()
    mtime = files[0].stat().st_mtime_ns
    # unchanged inputs and checkpoint: nothing is recomputed
    wf2 = _workflow("extract_features.json", None, **tiny["overrides"])
    wf2.run()
    summary = json.loads((feat_dir / "features_summary.json").read_text())
    assert summary["done"] == [] and len(summary["skipped"]) == 4
    assert files[0].stat().st_mtime_ns == mtime


def test_train_canvas_config(tiny):
    wf = _workflow("train_canvas.json", "train", max_epochs=60, batch_size=4, samples_per_slide=8,
                   learning_rate=1e-3, **tiny["overrides"])
    assert wf.check_properties() == []
    wf.run()
    assert (Path(tiny["overrides"]["ckpt_dir"]) / "unet.pt").exists()


def test_train_e2e_config(tiny):
    wf = _workflow("train_e2e.json", "train", max_epochs=1, chunk_size=32, **tiny["overrides"])
    assert wf.check_properties() == []
    encoder = wf.parser.get_parsed_content("encoder")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    wf.run()
    models = Path(tiny["overrides"]["ckpt_dir"])
    assert (models / "encoder_e2e.pt").exists() and (models / "unet_e2e.pt").exists()
    after = encoder.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert any(k.startswith("feature.") for k in changed), "end-to-end training did not update the encoder"
    assert not any(k.startswith("head.") for k in changed), "the final layer is not used end to end"


def test_inference_config_subprocess(tiny):
    o = tiny["overrides"]
    cmd = [*_INFERENCE_CMD,
           "--dataset_dir", o["dataset_dir"], "--output_dir", o["output_dir"], "--ckpt_dir", o["ckpt_dir"],
           "--canvas_size", str(o["canvas_size"])]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    heat = Path(o["output_dir"]) / "heatmaps"
    summary = json.loads((heat / "inference_summary.json").read_text())
    assert list(summary["slides"]) == ["test_000"] and summary["failed"] == {}
    d = heat / "test_000"
    for suffix in ("_prob.npy", "_prob.png", "_heatmap.tif", "_overlay.png", "_tumor.geojson", "_record.json"):
        assert (d / f"test_000{suffix}").exists(), suffix
    prob = np.load(d / "test_000_prob.npy")
    labels = np.load(d / "test_000_labels.npy")
    assert prob.shape == labels.shape == (16, 16)
    tissue = labels > -2
    assert np.isfinite(prob[tissue]).all() and np.isnan(prob[~tissue]).all()
    # the model trained above on two small demo slides separates tumor from normal on the held-out slide
    from monai_wsi_ext.evaluation.metrics import patch_metrics

    m = patch_metrics(prob[tissue], labels[tissue])
    assert m["n_tumor"] > 5 and m["n_normal"] > 30
    prevalence = m["n_tumor"] / m["n"]  # the PR-AUC of a random ranking
    assert m["roc_auc"] > 0.7, m  # chance is 0.5; with ~60 patches its standard error is about 0.07
    assert m["pr_auc"] > prevalence + 0.15, m


def test_inference_reports_bad_slide_and_goes_on(tiny, tmp_path):
    """A batch with an unreadable slide: the good one gets heatmaps, the bad one is reported, exit status != 0."""
    slides = tmp_path / "slides"
    slides.mkdir()
    good = Path(tiny["manifest"]).parent / "slides" / "test_000.tif"
    (slides / "good.tif").symlink_to(good)
    (slides / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    o = tiny["overrides"]
    out = tmp_path / "out"
    cmd = [*_INFERENCE_CMD,
           "--input_slides", str(slides), "--output_dir", str(out), "--ckpt_dir", o["ckpt_dir"],
           "--canvas_size", str(o["canvas_size"]), "--split", "None"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode != 0
    summary = json.loads((out / "heatmaps" / "inference_summary.json").read_text())
    assert "good" in summary["slides"] and "broken" in summary["failed"]
    assert "broken.tif" in summary["failed"]["broken"]
