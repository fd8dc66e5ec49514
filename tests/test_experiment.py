"""The baselines (segmentation only, frozen features), the one-command comparison (``run_experiment.py --quick``) and
the Camelyon16 recipe helpers (manifest, scaled stand-in run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SHARED_ANNOTATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "annotations" / "camelyon16" / \
    "Tumor_107.xml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("experiment")
    manifest = generate_dataset(root / "data", n_train=2, n_val=1, n_test=1, seed=5, width=768, height=768,
                                patch_size=64, n_lumps=1, tumor_regions=1, tumor_points=1)
    summary = prepare_dataset(collect_inputs(manifest=manifest), root / "prepared",
                              PrepareConfig(patch_size=64, thumbnail_max_size=512), progress=False)
    assert not summary["failed"]
    return root


def _workflow(configs: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json")] + [str(CONFIGS / c) for c in configs],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                        workflow_type=None, **overrides)
    wf.initialize()
    return wf


def test_grid_image_labels_and_cell_means(tiny):
    from monai_wsi_ext.baselines.segmentation import SlideImageDataset, cell_means, label_image, pixels_per_cell
    from monai_wsi_ext.model.canvas import IGNORE_INDEX
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.prep.prepare import load_prepared_slides

    assert pixels_per_cell(64, 8) == 8 and pixels_per_cell(256, 8) == 32
    with pytest.raises(ConfigError, match="whole number"):
        pixels_per_cell(64, 6)
    grid = np.array([[1, 0], [-1, -2]])
    lab = label_image(grid, 2)
    assert lab.shape == (4, 4) and lab[0, 0] == 1 and lab[1, 3] == 0 and lab[2, 0] == IGNORE_INDEX == lab[3, 3]
    img = np.arange(16, dtype=float).reshape(4, 4)
    assert np.allclose(cell_means(img, 2, (2, 2)), [[2.5, 4.5], [10.5, 12.5]])
    meta = load_prepared_slides(tiny / "prepared", "training")[0]
    ds = SlideImageDataset(str(tiny / "prepared"), "training", downsample=8, crop_size=48, seed=1)
    item = ds[0]
    assert item["image"].shape == (3, 48, 48) and item["label"].shape == (48, 48)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert set(torch.unique(item["label"]).tolist()) <= {IGNORE_INDEX, 0, 1}
    whole = SlideImageDataset(str(tiny / "prepared"), "training", downsample=8, train=False)[0]
    rows, cols = meta.grid.shape
    assert whole["image"].shape == (3, rows * 8, cols * 8)
    # the label image is the grid's labels, block for block
    assert np.array_equal(whole["label"].numpy()[::8, ::8], np.where(meta.grid.label_grid() < 0, IGNORE_INDEX,
                                                                      meta.grid.label_grid()))


def test_segmentation_baseline_config_trains_and_writes_prob_grids(tiny):
    torch.set_num_threads(1)
    out = tiny / "seg"
    wf = _workflow(["baseline_segmentation.json"], dataset_dir=str(tiny / "prepared"), output_dir=str(out),
                   ckpt_dir=str(out / "models"), max_epochs=1, batch_size=2, samples_per_slide=1, seg_crop_size=32,
                   seg_channels=[8, 16, 32, 64])
    wf.run()
    wf.finalize()
    assert (out / "models" / "seg_unet.pt").is_file()
    heat = out / "heatmaps_segmentation"
    summary = json.loads((heat / "inference_summary.json").read_text())
    assert summary["failed"] == {} and list(summary["slides"]) == ["test_000"]
    from monai_wsi_ext.prep.prepare import load_prepared_slides

    meta = load_prepared_slides(tiny / "prepared", "test")[0]
    prob = np.load(heat / "test_000" / "test_000_prob.npy")
    labels = np.load(heat / "test_000" / "test_000_labels.npy")
    assert prob.shape == labels.shape == tuple(meta.grid.shape)
    on_grid = labels != -2
    assert np.isfinite(prob[on_grid]).all() and np.isnan(prob[~on_grid]).all()
    assert ((prob[on_grid] >= 0) & (prob[on_grid] <= 1)).all()
    # the same evaluation as every other method
    from monai_wsi_ext.evaluation.report import evaluate_heatmaps

    overall = evaluate_heatmaps(heat, write=False)["overall"]
    assert overall["pooled_n"] == int((labels >= 0).sum())


def test_frozen_encoder_is_seeded_and_extraction_uses_it(tiny):
    from monai_wsi_ext.baselines.segmentation import frozen_encoder
    from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.model.predict import encode_slide
    from monai_wsi_ext.data.features import load_feature_file

    torch.set_num_threads(1)
    a = frozen_encoder(3, backbone="googlenet", feature_dim=4)
    torch.rand(100)  # other random draws in between do not change the weights
    b = frozen_encoder(3, backbone="googlenet", feature_dim=4)
    c = frozen_encoder(4, backbone="googlenet", feature_dim=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.feature.weight, c.feature.weight)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    out = tiny / "frozen"
    wf = _workflow(["extract_features.json", "baseline_frozen_features.json"], dataset_dir=str(tiny / "prepared"),
                   output_dir=str(out), seed=3, feature_dim=4, crop_size=56)
    wf.run()
    feats = load_feature_file(out / "features_frozen" / "test_000.npz")
    meta = load_prepared_slides(tiny / "prepared", "test")[0]
    source = SlidePatchSource.from_prepared(meta, make_patch_transform(False, 56), num_workers=0)
    direct, _ = encode_slide(b, source, batch_size=64, device="cpu", channels_last=False)
    source.close()
    assert np.allclose(feats["features"], direct, atol=1e-4)


def test_quick_experiment_writes_table_and_figure(tmp_path):
    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "scripts/run_experiment.py", "run", "--quick", "--output_dir", str(out),
                           "--threads", "1", "--table", str(tmp_path / "table.md")],
                          cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert (tmp_path / "table.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert [r.split("|")[1].strip() for r in rows] == ["Classifier only", "Segmentation only", "Frozen features",
                                                       "Separate learning", "End-to-end learning"]
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["summary"]] == ["classifier", "segmentation", "frozen", "separate", "e2e"]
    for row in results["summary"]:
        acc = row["pooled_accuracy"]["mean"]
        assert 0.0 <= acc <= 1.0 and row["n_seeds"] == 1
    for method in ("classifier", "segmentation", "frozen", "separate", "e2e"):
        assert (out / "seed_0" / "heatmaps" / method / "metrics_overall.json").is_file()
    from PIL import Image

    with Image.open(out / "figure.png") as im:
        assert im.width > 7 * 100 and im.height > 100  # 7 columns: slide, truth and five methods


def test_camelyon16_manifest_splits_and_negatives(tmp_path):
    images, ann = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    ann.mkdir()
    for name in ["Tumor_001", "Tumor_002", "Tumor_003", "Tumor_004", "Normal_001", "Normal_002", "Normal_003",
                 "Normal_004", "Test_001", "Test_002"]:
        (images / f"{name}.tif").write_bytes(b"")
    for name in ["tumor_001", "Tumor_002", "Tumor_003", "Tumor_004", "Test_001"]:
        (ann / f"{name}.xml").write_text("<ASAP_Annotations><Annotations /></ASAP_Annotations>")
    proc = subprocess.run([sys.executable, "scripts/camelyon16.py", "manifest", "--images", str(images),
                           "--annotations", str(ann), "--output", str(tmp_path / "manifest.json"),
                           "--val_fraction", "0.25"], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "manifest.json").read_text())
    splits = data["splits"]
    assert sorted(splits["test"]) == ["Test_001", "Test_002"]
    assert len(splits["validation"]) == 2 and len(splits["training"]) == 6  # one tumor, one normal held out
    assert sum(s.startswith("Tumor") for s in splits["validation"]) == 1
    recs = {r["id"]: r for r in data["slides"]}
    assert recs["Tumor_001"]["annotation"].endswith("tumor_001.xml") and not recs["Tumor_001"]["negative"]
    assert recs["Test_002"]["negative"] and recs["Normal_003"]["negative"]
    from monai_wsi_ext.io.annotations import read_annotations

    assert read_annotations(recs["Normal_003"]["annotation"]) == []  # an empty ASAP file: all tissue normal


@pytest.mark.skipif(not SHARED_ANNOTATION.is_file(), reason="real Camelyon16 annotations not available")
def test_camelyon16_standin_scaled(tmp_path):
    out = tmp_path / "standin"
    proc = subprocess.run([sys.executable, "scripts/camelyon16.py", "standin", "--output_dir", str(out),
                           "--annotation", str(SHARED_ANNOTATION), "--scale", "0.25", "--threads", "1"],
                          cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "standin_report.json").read_text())
    assert report["mpp"] == pytest.approx(0.243 / 0.25)
    # the real polygons label tumor patches on the stand-in; the negative slide is all normal
    assert report["prepared_counts"]["Tumor_107"]["tumor"] > 0
    normal = report["prepared_counts"]["Normal_001"]
    assert normal["tumor"] == 0 and normal["normal"] > 0
    for truth in ("annotations", "masks"):  # the XML and the mask TIFF give the same lesions
        assert math.isfinite(report["froc"][truth])
        assert report["froc_detail"][truth]["num_images"] == 2
    assert report["froc_detail"]["annotations"]["num_targets"] == report["froc_detail"]["masks"]["num_targets"] >= 1
    classes = {r["slide_id"]: r for r in report["slide_classes"]}
    assert classes["Normal_001"]["gt_class"] == "negative" and classes["Tumor_107"]["gt_class"] in ("micro", "macro")
    prob = np.load(out / "heatmaps" / "Tumor_107" / "Tumor_107_prob.npy")
    assert prob.shape == (math.floor(report["standin_size"][1] / 256), math.floor(report["standin_size"][0] / 256))


def test_camelyon16_overlay_prepare_settings(tiny, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("camelyon16_script", REPO / "scripts" / "camelyon16.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg, parser = mod._overlay_prepare_config()
    assert (cfg.patch_size, cfg.level, cfg.mpp, cfg.exhaustive) == (256, 0, 0.243, True)
    assert (cfg.tissue_threshold, cfg.tumor_threshold, cfg.normal_threshold) == (0.8, 0.2, 0.8)
    assert list(cfg.label_mask_tumor_values) == [1, 255] and list(cfg.label_mask_normal_values) == []
    assert parser.get_parsed_content("canvas_size") == 512 and parser.get_parsed_content("crop_size") == 224
    mod.prepare(manifest=str(tiny / "data" / "manifest.json"), output_dir=str(tmp_path / "prepared"))
    meta = json.loads((tmp_path / "prepared" / "test_000" / "meta.json").read_text())
    assert meta["patch_size"] == 256 and meta["mpp"] == 0.243 and meta["mpp_source"] == "user"
    assert meta["grid_shape"] == [3, 3]  # 768 px / 256 px cells
