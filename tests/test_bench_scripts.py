"""Smoke runs of the benchmark scripts (``--quick``), so that they keep working as the package changes.

The quick runs take tiny sizes and say nothing about speed; the assertions check the plumbing and the invariants that
do not depend on timing: every table cell is measured, the end-to-end step and naive back-propagation give the same
loss and gradients, the end-to-end step reads every patch once per pass, and ``--write_md`` keeps other sections.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"

OTHER_SECTION = "<!-- slide_reading:start -->\n## Slide reading\n\nkept as is\n<!-- slide_reading:end -->"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def e2e_quick(tmp_path_factory):
    """One ``bench_e2e_memory.py run --quick`` into a Markdown file that already holds another section."""
    tmp = tmp_path_factory.mktemp("bench_e2e")
    md = tmp / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\n{OTHER_SECTION}\n")
    out = tmp / "result.json"
    _run([str(SCRIPTS / "bench_e2e_memory.py"), "run", "--quick", "--threads", "1", "--work_dir", str(tmp / "work"),
          "--write_md", str(md), "--output_json", str(out)])
    return tmp, json.loads(out.read_text()), md.read_text()


def test_e2e_quick_matches_naive_and_rereads_patches(e2e_quick):
    _, res, _ = e2e_quick
    assert res["quick"] and res["inprocess"]
    rows = res["groups"][0]["rows"]
    assert [r["n"] for r in rows] == [64, 128]
    for r in rows:
        e, nv = r["e2e"], r["naive"]
        assert e["status"] == "ok" and nv["status"] == "ok"
        n, chunk = r["n"], e["chunk_size"]
        # the surrogate step reads every patch twice (one read per pass) and keeps none
        assert e["load_calls"] == 2 * math.ceil(n / chunk)
        assert e["patches_read"] == 2 * n
        assert e["decoded_bytes"] == 2 * n * 32 * 32 * 3
        assert nv["patches_read"] == n
        # same weights, pixels and seeds: the same loss and gradients
        assert e["loss"] == pytest.approx(nv["loss"], rel=1e-5)
        assert e["encoder_grad_norm"] == pytest.approx(nv["encoder_grad_norm"], rel=1e-4)
        assert e["unet_grad_norm"] == pytest.approx(nv["unet_grad_norm"], rel=1e-4)
        assert e["encoder_grad_norm"] > 0
        assert e["peak_rss"] > 0 and e["step_s"] > 0


def test_e2e_quick_writes_its_section_and_keeps_others(e2e_quick):
    _, res, text = e2e_quick
    assert OTHER_SECTION in text
    assert text.count("<!-- bench_e2e_memory:start -->") == 1 and text.count("<!-- bench_e2e_memory:end -->") == 1
    assert "| 128 | 32 -> 32 |" in text
    assert "Quick smoke run" in text


def test_e2e_child_subprocess_reports_its_own_peak(e2e_quick):
    """The real (non-quick) path: one measurement in a subprocess under a memory cap."""
    tmp, _, _ = e2e_quick
    bench = _load_script("bench_e2e_memory")
    prepared = next((tmp / "work").glob("prepared_*_p32"))
    spec = {"mode": "idle", "n": 16, "prepared_dir": str(prepared), "crop_size": None, "chunk_size": 16,
            "threads": 1, "device": "cpu", "seed": 0, "channels_last": True, "backend": "auto"}
    res = bench.run_child(spec, tmp / "children", cap_bytes=8 * bench.GB, timeout_s=240)
    assert res["status"] == "ok", res
    # a process that imported torch and built two networks holds a few hundred MB at least
    assert 200 * 1024**2 < res["peak_rss"] <= res["wait4_peak_rss"]
    assert res["distinct_cells"] == 16 and res["canvas_size"] == 16
    assert not list((tmp / "children").glob("result_*.json"))  # temporary files removed


def test_inference_quick_cli(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\n{OTHER_SECTION}\n")
    out = tmp_path / "result.json"
    _run([str(SCRIPTS / "bench_inference.py"), "run", "--quick", "--threads", "1", "--work_dir",
          str(tmp_path / "work"), "--write_md", str(md), "--output_json", str(out)])
    res = json.loads(out.read_text())
    cells = res["encoder"]
    # 2 memory formats x 2 batch sizes x 2 grad modes, every one measured
    assert {(c["format"], c["batch_size"], c["grad_mode"]) for c in cells} == {
        (f, b, m) for f in ("nchw", "channels_last") for b in (2, 4) for m in ("no_grad", "inference_mode")}
    assert all(c["rate"] > 0 for c in cells)
    sl = res["slide"]
    assert sl["n_patches"] > 0
    assert sl["slide_s"] > 0 and sl["encoder_s"] > 0
    assert sl["ratio"] == pytest.approx(sl["slide_s"] / sl["encoder_s"], rel=1e-2)
    text = md.read_text()
    assert OTHER_SECTION in text
    assert "<!-- bench_inference:start -->" in text and "**baseline**" in text
    assert "Slide inference / encoder-only" in text


@pytest.mark.parametrize("script", ["bench_inference", "bench_e2e_memory"])
def test_replace_section_inserts_replaces_and_keeps_others(tmp_path, script):
    mod = _load_script(script)
    md = tmp_path / "B.md"
    mod.replace_section(md, "mine", "first")  # created
    assert md.read_text().startswith("# Benchmarks\n")
    md.write_text(md.read_text() + f"\n{OTHER_SECTION}\n")
    mod.replace_section(md, "mine", "second")
    text = md.read_text()
    assert "second" in text and "first" not in text and OTHER_SECTION in text
    assert text.count("<!-- mine:start -->") == 1
    md.write_text("<!-- mine:start -->\nbroken")
    with pytest.raises(ValueError, match="only one of the markers"):
        mod.replace_section(md, "mine", "third")
