"""Tests of the hierarchical pipeline (``monai_wsi_ext.hierarchical``, ``bundle/configs/hierarchical.json``): a slide
classifier gate in front of tile segmentation on generated tumor and tumor-free slides; skipped slides are not
inferred and are reported; compute saved and sensitivity lost against the full run; heatmap aggregation on the
tile U-Net's real heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_wsi_ext.slidecls.scores import read_slide_scores, slide_score_metrics, write_slide_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
TILE = {"tile_size": 128, "min_object_um2": 200.0}


def _workflow(configs: list[str], workflow_type: str | None, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON] + [str(CONFIGS / c) for c in configs], workflow_type=workflow_type,
                        logging_file=str(CONFIGS / "logging.conf"), **overrides)
    wf.initialize()
    return wf


def _run(configs: list[str], workflow_type: str | None, **overrides):
    wf = _workflow(configs, workflow_type, **overrides)
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def trained(mixed_dataset, tmp_path_factory):
    """A slide CNN (the gate) and a tile U-Net trained for seconds on the 8 training slides; the U-Net run on every
    validation and test slide (the full method)."""
    root = tmp_path_factory.mktemp("hier")
    o = {**mixed_dataset["overrides"], "ckpt_dir": str(root / "models"), "output_dir": str(root / "out")}
    _run(["train_slide_cnn.json"], "train", max_epochs=10, samples_per_epoch=32, learning_rate=3e-3, thumb_mpp=8.0,
         thumb_size=64, **o)
    _run(["train_tile_seg.json"], "train", max_epochs=3, batch_size=8, samples_per_epoch=48, learning_rate=3e-3,
         tile_size=128, **o)
    full = root / "out" / "heatmaps_tile_seg"
    _run(["infer_tile_seg.json"], "infer", heatmap_dir=str(full), **TILE, **o)
    val = root / "out" / "heatmaps_tile_seg_val"
    _run(["infer_tile_seg.json"], "infer", heatmap_dir=str(val), split="validation", **TILE, **o)
    return {"root": root, "overrides": o, "full": full, "val": val}


def test_the_gate_skips_what_it_rejects_and_reports_it(mixed_dataset, trained):
    """Slide CNN gate -> tile segmentation, declared by hierarchical.json over infer_tile_seg.json: the slides the
    gate rejects are not segmented (no pixel outputs), get all-negative grid outputs marked ``skipped_by_gate``, and
    hierarchical_summary.json lists them with their patches and tiles, the seconds saved against the full run and
    the sensitivity lost. Measured (seed 5): the gate passes the 4 tumor slides and 1 of the 4 tumor-free ones,
    skipping 3 slides (about a third of the patches) with no tumor slide lost."""
    o = trained["overrides"]
    wf = _workflow(["infer_tile_seg.json", "hierarchical.json"], "infer", gate_thumb_mpp=8.0, gate_thumb_size=64,
                   full_heatmap_dir=str(trained["full"]), truth_dir=str(mixed_dataset["manifest"]), **TILE, **o)
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    out = Path(o["output_dir"]) / "heatmaps_hierarchical"
    summary = json.loads((out / "hierarchical_summary.json").read_text())
    labels = mixed_dataset["labels"]
    # the gate's own decisions, recomputed from its checkpoint
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.slidecls.cnn import SlideCNNClassifier

    gate = SlideCNNClassifier(str(Path(o["ckpt_dir"]) / "slide_cnn.pt"), thumb_mpp=8.0, thumb_size=64)
    scores = {p.slide_id: gate(p) for p in load_prepared_slides(mixed_dataset["prepared"], "test")}
    rejected = sorted(s for s, v in scores.items() if v <= 0.5)
    assert sorted(summary["skipped"]) == rejected and summary["n_skipped"] == len(rejected) > 0
    assert summary["n_passed"] + summary["n_skipped"] == summary["n_slides"] == 8
    for sid, score in summary["skipped"].items():
        assert score == pytest.approx(scores[sid], abs=1e-5)
        record = json.loads((out / sid / f"{sid}_record.json").read_text())
        assert record["skipped_by_gate"] and not (out / sid / f"{sid}_pixel_prob.npy").exists()
        prob = np.load(out / sid / f"{sid}_prob.npy")
        assert np.nanmax(prob) == 0.0
    for sid in summary["passed"]:
        assert (out / sid / f"{sid}_pixel_prob.npy").is_file()
    inference = json.loads((out / "inference_summary.json").read_text())
    assert {s for s, r in inference["slides"].items() if r["status"] == "skipped_by_gate"} == set(rejected)
    # what was skipped: patches and tissue tiles of the rejected slides
    full_summary = json.loads((trained["full"] / "inference_summary.json").read_text())["slides"]
    assert summary["tiles_skipped"] == sum(full_summary[s]["tiles"] for s in rejected)
    assert 0 < summary["patches_skipped"] < summary["patches_total"]
    assert summary["slides_with_tumor_skipped"] == sorted(s for s in rejected if labels[s])
    vs = summary["vs_full"]
    assert vs["slides"] == 8 and vs["full_seconds"] > 0 and vs["saved_seconds"] == pytest.approx(
        vs["full_seconds"] - vs["chain_seconds"], abs=1e-3)
    assert vs["slide_sensitivity_lost"] == pytest.approx(
        vs["slide_sensitivity_full"] - vs["slide_sensitivity_chain"])
    assert vs["patch_sensitivity_chain"] <= vs["patch_sensitivity_full"] + 1e-12
    assert "froc_chain" in vs and "froc_full" in vs
    # the chain's folder is a heatmap folder of every slide: evaluate.json scores it
    _run(["evaluate.json"], None, output_dir=o["output_dir"], heatmap_dir=str(out),
              truth_dir=str(mixed_dataset["manifest"]))
    assert json.loads((out / "metrics_overall.json").read_text())["n_slides"] == 8


def test_a_gate_that_rejects_every_slide_completes_and_reports_all(mixed_dataset, trained, tmp_path):
    """A slide-scores file as the gate (here every test slide at 0.1, one slide not listed: passed by default):
    the run ends normally with every listed slide skipped and reported, and the unlisted one segmented."""
    o = {**trained["overrides"], "output_dir": str(tmp_path / "out")}
    ids = sorted(s for s in mixed_dataset["labels"] if s.startswith("test_"))
    scores = write_slide_scores(tmp_path / "slide_scores_low.json", "low", {s: {"score": 0.1} for s in ids[1:]})
    _run(["infer_tile_seg.json", "hierarchical.json"], "infer", gate_scores=str(scores), **TILE, **o)
    summary = json.loads((Path(o["output_dir"]) / "heatmaps_hierarchical" / "hierarchical_summary.json").read_text())
    assert sorted(summary["skipped"]) == ids[1:] and list(summary["passed"]) == [ids[0]]
    assert summary["per_slide"][ids[0]]["note"].startswith("no gate score")
    assert summary["gate"] == "low" and summary["tiles_inferred"] > 0


@pytest.mark.parametrize("base, inferer", [("inference.json", "CanvasInferer"),
                                           ("infer_maskrcnn.json", "MaskRCNNInferer")])
def test_the_overlay_gates_the_canvas_method_and_mask_rcnn_too(mixed_dataset, trained, base, inferer):
    """hierarchical.json over inference.json (the canvas method) or infer_maskrcnn.json: the dataloader serves the
    gated dataset and the report runs before the inference summary."""
    from monai_wsi_ext.hierarchical import GatedSlideDataset, HierarchicalReport
    from monai_wsi_ext.outputs.handlers import InferenceSummary

    extra = {"canvas_size": 32} if base == "inference.json" else {"tile_size": 128}
    wf = _workflow([base, "hierarchical.json"], "infer", gate_thumb_mpp=8.0, gate_thumb_size=64, **extra,
                   **trained["overrides"])
    loader = wf.parser.get_parsed_content("dataloader")
    assert isinstance(loader.dataset, GatedSlideDataset)
    kinds = [type(h) for h in wf.parser.get_parsed_content("evaluator#val_handlers")]
    assert kinds.index(HierarchicalReport) == len(kinds) - 2 and kinds[-1] is InferenceSummary
    assert wf.parser.get_parsed_content("hierarchical_chain")[1] == inferer


def test_aggregation_of_the_tile_unet_heatmaps(mixed_dataset, trained, tmp_path):
    """Heatmap aggregation fitted on the tile U-Net's 4 validation heatmaps, applied to its 8 test heatmaps, next to
    the heatmap maximum, in evaluate.json. Measured (seed 5): ROC-AUC 1.0, accuracy 0.75 (sensitivity 0.5,
    specificity 1.0; chance 0.5)."""
    o = {**trained["overrides"], "output_dir": str(tmp_path / "out")}
    test = trained["full"]
    _run(["aggregate_heatmaps.json"], None, heatmap_dir=str(test), val_heatmap_dir=str(trained["val"]),
         truth_dir=str(mixed_dataset["manifest"]), slide_scores_path=str(tmp_path / "slide_scores_agg.json"), **o)
    scores = read_slide_scores(tmp_path / "slide_scores_agg.json")
    ids = sorted(scores.scores)
    m = slide_score_metrics([scores.scores[s] for s in ids], [mixed_dataset["labels"][s] for s in ids])
    assert m["n"] == 8 and m["roc_auc"] >= 0.75 and m["accuracy"] >= 0.625, m
