"""The issue-12 comparison (``scripts/run_workflows.py``) at smoke-test size: every workflow trains, infers and is
evaluated, and the table has a row per method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quick_workflow_comparison(tmp_path):
    import run_workflows

    res = run_workflows.run(output_dir=str(tmp_path), quick=True, log_level="WARNING")
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"tile_unet", "maskrcnn", "hierarchical", "slide_cnn", "aggregation_tile_unet"}
    for name in ("tile_unet", "maskrcnn", "hierarchical"):
        assert rows[name]["pooled_accuracy"] is not None and rows[name]["pixel_dice"] is not None, name
    for name in ("slide_cnn", "aggregation_tile_unet"):
        assert rows[name]["slide_roc_auc"] is not None and rows[name]["slide_accuracy"] is not None, name
    hier = res["hierarchical"]
    assert hier["n_slides"] == 2 and hier["n_passed"] + hier["n_skipped"] == 2 and "vs_full" in hier
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n| ") == 6 and "Hierarchical chain" in md
    assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == list(rows)
