"""Smoke run of ``scripts/bench_runtime_sweep.py run --quick``: every installed runtime / precision is measured at
every batch and thread count, the ratios are against eager torch at the reference batch (the largest quick batch,
batch 16 not being measured), and ``--write_md`` writes its own section and keeps the others. Quick mode skips
torch.compile (compiling takes a minute or more) and says nothing about speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from monai_wsi_ext.runtime import runtime_available

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "bench_runtime_sweep.py"

OTHER_SECTION = "<!-- slide_reading:start -->\n## Slide reading\n\nkept as is\n<!-- slide_reading:end -->"


def test_runtime_sweep_quick(tmp_path):
    md = tmp_path / "B.md"
    md.write_text(f"# Benchmarks\n\n{OTHER_SECTION}\n")
    out = tmp_path / "r.json"
    args = [sys.executable, str(SCRIPT), "run", "--quick", "--write_md", str(md), "--output_json", str(out),
            "--work_dir", str(tmp_path / "w")]
    proc = subprocess.run(args, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())

    assert res["quick"]
    s = res["settings"]
    assert (s["batch_sizes"], s["threads"], s["n_patches"], s["image_size"]) == ([2, 4], [1], 8, 32)
    assert not s["compile"] and res["compile"] is None
    assert s["reference_batch"] == 16 and s["reference_batch_used"] == 4

    expected = ["torch eager fp32"]
    if runtime_available("onnxruntime"):
        expected += ["onnxruntime fp32", "onnxruntime int8"]
    if runtime_available("openvino"):
        expected.append("openvino fp32")
        if runtime_available("onnxruntime"):  # the int8 model is quantised with ONNX Runtime
            expected.append("openvino int8")
    assert sorted(res["configs"]) == sorted(expected)
    cells = {(c["config"], c["batch_size"], c["threads"]): c for c in res["cells"]}
    assert len(cells) == len(res["cells"]) == len(expected) * 2
    for name in expected:
        for b in (2, 4):
            c = cells[name, b, 1]
            assert math.isfinite(c["rate"]) and c["rate"] > 0, c
            assert math.isfinite(c["ratio"]) and c["ratio"] > 0, c
            assert c["patches"] == 8 and len(c["rounds"]) == 1
    ref = cells["torch eager fp32", 4, 1]
    assert ref["ratio"] == 1.0
    for c in res["cells"]:
        assert math.isclose(c["ratio"], c["rate"] / ref["rate"], rel_tol=1e-2)
    fastest = {(f["config"], f["threads"]): f for f in res["fastest"]}
    assert set(fastest) == {(name, 1) for name in expected}
    for (name, t), f in fastest.items():
        assert f["rate"] == max(cells[name, b, t]["rate"] for b in (2, 4))

    text = md.read_text()
    assert OTHER_SECTION in text
    assert text.count("<!-- bench_runtime_sweep:start -->") == 1 and text.count("<!-- bench_runtime_sweep:end -->") == 1
    assert "## Runtime, batch size and threads (CPU encoder-only sweep)" in text
    assert "torch eager fp32 at batch 4 (batch 16 was not measured" in text
    assert "Quick smoke run" in text and "### 1 thread" in text
    assert "| torch eager fp32 | " in text and "**reference**" in text
