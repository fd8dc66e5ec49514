"""Tests of monai_wsi_ext.evaluation.report and bundle/configs/evaluate.json on hand-made heatmap folders with known
metrics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from monai_wsi_ext.evaluation import metrics as M
from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.evaluation.report import (
    comparison_figure,
    evaluate_heatmaps,
    find_truth,
    label_map_rgb,
    load_heatmap_dir,
    load_truth_mask,
    markdown_table,
    patient_stages,
    prob_map_rgb,
    read_reference_stages,
    summarize_runs,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
CELL, MPP = 256, 0.5
T, N, U, B = M.LABEL_TUMOR, M.LABEL_NORMAL, M.LABEL_NOLABEL, M.LABEL_BACKGROUND

# slide A: a 3x3 tumor block (one cell nolabel), normal tissue, a background column
LABELS_A = np.array([
    [T, T, T, N, B],
    [T, U, T, N, B],
    [T, T, T, N, B],
    [N, N, N, N, B],
    [N, N, N, N, B],
])
PROBS_A = np.array([
    [0.9, 0.8, 0.7, 0.3, np.nan],
    [0.6, 0.5, 0.95, 0.2, np.nan],
    [0.4, 0.85, 0.75, 0.1, np.nan],
    [0.2, 0.1, 0.3, 0.2, np.nan],
    [0.1, 0.2, 0.3, 0.6, np.nan],
])
# slide B: all normal; an isolated false positive (a tumor point) and a false-positive component that includes a
# nolabel cell (not a tumor point)
LABELS_B = np.array([
    [N, N, N, N],
    [N, N, N, N],
    [N, N, U, N],
    [N, N, N, N],
])
PROBS_B = np.array([
    [0.7, 0.2, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.6, 0.55],
    [0.1, 0.1, 0.1, 0.1],
])


def _write_slide(root: Path, sid: str, probs: np.ndarray, labels: np.ndarray, mpp: float | None = MPP) -> None:
    d = root / sid
    d.mkdir(parents=True)
    np.save(d / f"{sid}_prob.npy", probs.astype(np.float32))
    np.save(d / f"{sid}_labels.npy", labels.astype(np.int64))
    rows, cols = probs.shape
    (d / f"{sid}_record.json").write_text(json.dumps(
        {"slide_id": sid, "cell_size": CELL, "mpp": mpp, "slide_size": [cols * CELL, rows * CELL]}))


@pytest.fixture()
def heatmaps(tmp_path) -> Path:
    root = tmp_path / "heatmaps"
    _write_slide(root, "slide_a", PROBS_A, LABELS_A)
    _write_slide(root, "slide_b", PROBS_B, LABELS_B)
    (root / "inference_summary.json").write_text("{}")  # files next to the slide folders are ignored
    return root


def _expected_pooled():
    keep_a, keep_b = LABELS_A >= 0, LABELS_B >= 0
    probs = np.concatenate([PROBS_A[keep_a], PROBS_B[keep_b]])
    labels = np.concatenate([LABELS_A[keep_a], LABELS_B[keep_b]])
    return probs, labels


def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_per_slide_and_overall_values(heatmaps):
    result = evaluate_heatmaps(heatmaps)
    rows = {r["slide_id"]: r for r in result["per_slide"]}
    a, b = rows["slide_a"], rows["slide_b"]
    # slide A: 8 tumor + 11 normal labelled cells; all right except 0.4 (T) and 0.6 (N, bottom row)
    assert (a["n"], a["n_tumor"], a["n_normal"]) == (19, 8, 11)
    assert a["accuracy"] == pytest.approx(17 / 19)
    keep = LABELS_A >= 0
    assert a["pr_auc"] == pytest.approx(average_precision_score(LABELS_A[keep], PROBS_A[keep]))
    assert a["roc_auc"] == pytest.approx(roc_auc_score(LABELS_A[keep], PROBS_A[keep]))
    # Dice on labelled cells: predicted tumor {0.9,0.8,0.7,0.6,0.95,0.85,0.75} + the normal 0.6 -> 2*7/(8+8)
    assert a["dice"] == pytest.approx(14 / 16)
    assert a["tumor_points"] == 1  # the isolated 0.6 in normal tissue in the bottom row
    assert a["slide_score"] == pytest.approx(0.95) and a["slide_label"] == 1
    # 3x3 cells of 128 µm: the tumor block's longest diameter is 3*sqrt(2) cells -> micro (0.2-2 mm)
    assert a["gt_class"] == "micro" and a["mpp"] == MPP and a["cell_size"] == CELL
    # slide B: 15 normal cells, 2 predicted tumor; only the isolated one is a tumor point
    assert (b["n"], b["n_tumor"], b["accuracy"]) == (15, 0, pytest.approx(13 / 15))
    assert b["pr_auc"] is None and b["tumor_points"] == 1 and b["slide_label"] == 0 and b["gt_class"] == "negative"
    overall = result["overall"]
    probs, labels = _expected_pooled()
    assert overall["n_slides"] == 2 and overall["pooled_n"] == 34
    assert overall["pooled_accuracy"] == pytest.approx(30 / 34)
    assert overall["pooled_pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    assert overall["pooled_roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert overall["slide_auc"] == pytest.approx(1.0)  # 0.95 (tumor slide) > 0.7 (normal slide)
    assert overall["total_tumor_points"] == 2 and overall["mean_tumor_points"] == pytest.approx(1.0)
    assert overall["froc"] is None  # no truth masks given


def test_files_are_written_atomically_and_strict(heatmaps, tmp_path):
    out = tmp_path / "metrics"
    result = evaluate_heatmaps(heatmaps, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics_overall.json", "metrics_per_slide.csv",
                                                     "metrics_per_slide.json"]
    overall = _strict_json(out / "metrics_overall.json")
    assert overall == result["overall"]
    per_slide = _strict_json(out / "metrics_per_slide.json")
    assert [r["slide_id"] for r in per_slide] == ["slide_a", "slide_b"]
    with open(out / "metrics_per_slide.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == ["slide_a", "slide_b"]
    assert float(rows[0]["accuracy"]) == pytest.approx(17 / 19)
    assert rows[1]["pr_auc"] == ""  # undefined: empty cell, not "nan"
    assert int(rows[1]["tumor_points"]) == 1


def test_truth_masks_froc_and_missing_truth(heatmaps, tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    # slide A's lesion as a mask at downsample 64: the 3x3-cell block (768 px = 384 µm, not an ITC)
    tumor = np.zeros((20, 20), bool)
    tumor[0:12, 0:12] = True
    np.savez(truth / "SLIDE_A_truth.npz", tumor=tumor, downsample=np.int64(64))  # found case-insensitively
    assert find_truth("slide_a", truth) == truth / "SLIDE_A_truth.npz"
    assert find_truth("slide_b", truth) is None
    skip = evaluate_heatmaps(heatmaps, tmp_path / "m1", truth=truth)["overall"]
    # slide A alone: the tumor component (max 0.95) hits the lesion, the isolated 0.6 is one FP
    assert skip["froc_detail"]["num_images"] == 1 and skip["froc_detail"]["num_targets"] == 1
    direct = M.lesion_froc([{"prob_map": PROBS_A, "cell_size": CELL, "tumor_mask": tumor, "mask_downsample": 64,
                             "mpp": MPP}])
    assert skip["froc"] == pytest.approx(direct["froc"])
    neg = evaluate_heatmaps(heatmaps, tmp_path / "m2", truth=truth, missing_truth="negative")
    assert neg["overall"]["froc_detail"]["num_images"] == 2
    rows = {r["slide_id"]: r for r in neg["per_slide"]}
    assert rows["slide_b"]["truth"].startswith("negative") and rows["slide_a"]["truth"].endswith("_truth.npz")
    # the ground-truth class comes from the mask: 12 px of 32 µm, diameter 12*sqrt(2) px
    assert rows["slide_a"]["gt_diameter_um"] == pytest.approx(M.largest_tumor_diameter_um(tumor, 64 * MPP))
    # a perfect map scores FROC 1
    perfect = tmp_path / "perfect"
    _write_slide(perfect, "slide_a", np.where(LABELS_A == T, 0.9, np.where(LABELS_A >= U, 0.1, np.nan)), LABELS_A)
    assert evaluate_heatmaps(perfect, truth=truth, write=False)["overall"]["froc"] == pytest.approx(1.0)


def test_truth_from_xml_and_mask_tiff_agree(tmp_path):
    import tifffile

    from monai_wsi_ext.io.annotations import AnnotationLabel, AnnotationPolygon, rasterize_annotations, write_asap_xml

    square = AnnotationPolygon(exterior=np.array([[256, 256], [1280, 256], [1280, 1024], [256, 1024]], float),
                               label=AnnotationLabel.TUMOR, group="_0")
    hole = AnnotationPolygon(exterior=np.array([[512, 512], [768, 512], [768, 768], [512, 768]], float),
                             label=AnnotationLabel.EXCLUDE, group="_2")
    xml = write_asap_xml(tmp_path / "s.xml", [square, hole])
    size = (2048, 1536)
    from_xml = load_truth_mask(xml, size, mask_downsample=32)
    assert from_xml.downsample == 32 and from_xml.tumor.shape == (48, 64)
    assert from_xml.tumor.sum() == (32 * 24 - 8 * 8)  # 1024x768 px square minus the 256x256 hole, at 1/32
    full = rasterize_annotations([square, hole], (1536, 2048), 1.0) == 2
    levels = [np.where(full, 255, 0).astype(np.uint8)]
    while min(levels[-1].shape) > 32:
        levels.append(levels[-1][::2, ::2])
    with tifffile.TiffWriter(tmp_path / "s_Mask.tif") as tif:
        for i, lev in enumerate(levels):
            tif.write(lev, tile=(64, 64), subfiletype=1 if i else 0, photometric="minisblack", metadata=None)
    from_tif = load_truth_mask(tmp_path / "s_Mask.tif", size, mask_downsample=32)
    assert from_tif.downsample == 32 and from_tif.tumor.shape == from_xml.tumor.shape  # level 5 of 0..6
    assert np.array_equal(from_tif.tumor, from_xml.tumor)
    coarse = load_truth_mask(tmp_path / "s_Mask.tif", size, mask_downsample=100)  # coarsest level not above 100
    assert coarse.downsample == 64


def test_camelyon17_patients_and_kappa(tmp_path):
    heat = tmp_path / "heat"
    macro = np.full((20, 20), N)
    macro[2:19, 2:19] = T  # 17 cells of 128 µm: > 2 mm -> macro
    micro = np.full((20, 20), N)
    micro[5:8, 5:8] = T  # ~0.5 mm -> micro
    neg = np.full((20, 20), N)
    grids = {"patient_000_node_0": macro, "patient_000_node_1": neg, "patient_001_node_0": micro,
             "patient_001_node_1": neg, "patient_002_node_0": neg}
    for sid, lab in grids.items():
        _write_slide(heat, sid, np.where(lab == T, 0.9, 0.1), lab)  # perfect predictions
    csv_path = tmp_path / "stages.csv"
    csv_path.write_text("patient,stage\npatient_000.zip,pN1\npatient_000_node_0.tif,macro\npatient_001.zip,pN1mi\n"
                        "patient_002.zip,pN1\n")
    assert read_reference_stages(csv_path) == {"patient_000": "pN1", "patient_001": "pN1mi", "patient_002": "pN1"}
    overall = evaluate_heatmaps(heat, reference_stages=csv_path, write=False)["overall"]
    pats = overall["patients"]
    assert {p: v["pred"] for p, v in pats.items()} == {"patient_000": "pN1", "patient_001": "pN1mi",
                                                       "patient_002": "pN0"}
    ref, pred = ["pN1", "pN1mi", "pN1"], ["pN1", "pN1mi", "pN0"]
    assert overall["kappa"] == pytest.approx(M.quadratic_kappa(ref, pred))
    # without a reference file the reference stages come from the ground truth: perfect maps -> kappa 1
    assert evaluate_heatmaps(heat, write=False)["overall"]["kappa"] == pytest.approx(1.0)
    assert patient_stages({"patient_009_node_3": "itc", "other": "macro"}) == {
        "patient_009": {"stage": "pN0(i+)", "slides": ["patient_009_node_3"]}}


def test_no_mpp_drops_slide_classes_and_mpp_argument_restores_them(tmp_path):
    heat = tmp_path / "heat"
    _write_slide(heat, "s", PROBS_A, LABELS_A, mpp=None)
    row = evaluate_heatmaps(heat, write=False)["per_slide"][0]
    assert row["pred_class"] is None and row["gt_class"] is None and row["accuracy"] == pytest.approx(17 / 19)
    row = evaluate_heatmaps(heat, mpp=0.243, write=False)["per_slide"][0]
    assert row["gt_class"] == "micro" and row["mpp"] == 0.243


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(MonaiWsiExtError, match="not a folder"):
        load_heatmap_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MonaiWsiExtError, match="holds no"):
        load_heatmap_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    _write_slide(bad, "s", PROBS_A, LABELS_A)
    np.save(bad / "s" / "s_labels.npy", np.zeros((2, 2), np.int64))
    with pytest.raises(MonaiWsiExtError, match="differs from the probability grid"):
        load_heatmap_dir(bad)


def test_evaluate_config_runs_through_config_workflow(heatmaps, tmp_path):
    from monai.bundle import ConfigWorkflow

    truth = tmp_path / "truth"
    truth.mkdir()
    tumor = np.zeros((20, 20), bool)
    tumor[0:12, 0:12] = True
    np.savez(truth / "slide_a_truth.npz", tumor=tumor, downsample=np.int64(64))
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "evaluate.json")],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                        workflow_type=None, heatmap_dir=str(heatmaps), truth_dir=str(truth),
                        metrics_dir=str(tmp_path / "m"), missing_truth="negative")
    wf.initialize()
    wf.run()
    wf.finalize()
    overall = _strict_json(tmp_path / "m" / "metrics_overall.json")
    expected = evaluate_heatmaps(heatmaps, truth=truth, missing_truth="negative", write=False)["overall"]
    assert overall == expected
    assert overall["froc_detail"]["num_images"] == 2 and math.isfinite(overall["froc"])


def test_summarize_runs_table_and_figure(heatmaps, tmp_path):
    per_seed = {0: {"classifier": {"pooled_accuracy": 0.9, "pooled_pr_auc": 0.8, "mean_tumor_points": 3.0,
                                   "mean_dice": 0.5, "froc": None},
                    "separate": {"pooled_accuracy": 0.95, "pooled_pr_auc": 0.9, "mean_tumor_points": 0.0,
                                 "mean_dice": 0.7}},
                1: {"classifier": {"pooled_accuracy": 0.8, "pooled_pr_auc": 0.6, "mean_tumor_points": 5.0,
                                   "mean_dice": 0.4}}}
    rows = summarize_runs(per_seed, ["classifier", "separate", "e2e"])
    assert [r["method"] for r in rows] == ["classifier", "separate"]
    acc = rows[0]["pooled_accuracy"]
    assert acc["mean"] == pytest.approx(0.85) and acc["sd"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert rows[1]["n_seeds"] == 1 and math.isnan(rows[1]["pooled_accuracy"]["sd"])
    table = markdown_table(rows, caption="caption")
    lines = table.splitlines()
    assert lines[0].startswith("| Method | Accuracy (%) | PR-AUC (%)")
    assert lines[2] == "| Classifier only | 85.00 ± 7.07 | 70.00 ± 14.14 | n/a | 4.00 ± 1.41 | 45.00 ± 7.07 | n/a |"
    assert lines[3].startswith("| Separate learning | 95.00 | 90.00 | n/a | 0.00 |")
    assert lines[-1] == "caption"
    # map colours and the figure layout: 2 slides, 4 columns (slide, truth, two methods)
    rgb = label_map_rgb(LABELS_A)
    assert tuple(rgb[0, 0]) == (215, 25, 28) and tuple(rgb[1, 1]) == (150, 90, 200) and tuple(rgb[0, 4]) == (255,) * 3
    p = prob_map_rgb(np.array([[0.0, 1.0, np.nan]]))
    assert [tuple(v) for v in p[0]] == [(190, 190, 190), (215, 25, 28), (255, 255, 255)]
    from PIL import Image

    png = comparison_figure({"classifier": heatmaps, "separate": heatmaps}, tmp_path / "fig.png", panel_height=40)
    with Image.open(png) as im:
        assert im.height == 18 + 2 * (40 + 14 + 6) + 6
        assert im.width == 4 * 40 + 5 * 6  # square grids: 40 px wide panels
