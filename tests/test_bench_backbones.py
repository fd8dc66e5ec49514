"""scripts/bench_backbones.py: every backbone is timed in both modes, the first is the ratio baseline, and its
section replaces only its own markers in the Markdown file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_backbones.py"


def test_bench_backbones_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("_bench_backbones", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    result = mod.run(backbones="small_cnn,resnet18", size=32, batch=4, patches=8, rounds=1, threads=1,
                     write_md=str(md), output_json=str(tmp_path / "r.json"))
    assert set(result["best"]) == {"small_cnn", "resnet18"}
    assert all(v["inference"] > 0 and v["training"] > 0 for v in result["best"].values())
    assert result["params"]["resnet18"] > 10 * result["params"]["small_cnn"]
    text = md.read_text()
    assert "kept" in text and text.count("<!-- bench_backbones:start -->") == 1
    assert "| `small_cnn` | 0.39 M |" in text and "(1.00x)" in text
    assert json.loads((tmp_path / "r.json").read_text())["batch"] == 4
