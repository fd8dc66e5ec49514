"""Reliability of the prepare step as a whole (issue 8 items 5, 6 and the wiring of 7-9): the per-slide "done"
marker never trusts stale files (fault injection between every two writes), runs into one folder merge their
splits (the README's two commands), and the summary carries every warning and status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, collect_inputs, load_prepared, prepare_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_dataset.py"


def _datalist(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def _patch_sizes(out: Path) -> set[int]:
    return {item["size"][0] for items in _datalist(out).values() for item in items}


# ------------------------------------------------------------------------------------- 5. stale files never trusted
class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, not even ``except Exception``."""


def test_kill_between_any_two_writes_never_leaves_a_stale_slide(tmp_path, synthetic_dataset, monkeypatch):
    """A run at 64 px completes; a run at 128 px over it is killed at its k-th file write (every k). The next run
    at 64 px must redo whatever the killed run touched and end with a datalist of 64 px patches only; before the
    marker covered the files, a kill right before ``meta.json`` was renamed left the old marker beside the new
    patch table and the slide was skipped with 128 px patches in a 64 px datalist."""
    inputs = collect_inputs(manifest=synthetic_dataset.manifest)[:1]
    base = tmp_path / "base"
    prepare_dataset(inputs, base, PrepareConfig(patch_size=64), progress=False)
    assert _patch_sizes(base) == {64}

    real_replace = os.replace
    n_writes = 0
    k = 0
    while True:
        out = tmp_path / f"kill{k}"
        shutil.copytree(base, out)
        calls = {"n": 0}

        def replace(src, dst, _k=k):
            if calls["n"] == _k:
                raise _Killed
            calls["n"] += 1
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            prepare_dataset(inputs, out, PrepareConfig(patch_size=128), progress=False)
            finished = True
        except _Killed:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        if finished:
            n_writes = k
            break
        summary = prepare_dataset(inputs, out, PrepareConfig(patch_size=64), progress=False)
        for meta_path in out.glob("*/meta.json"):
            assert load_prepared(meta_path.parent).meta["patch_size"] == 64
        assert _patch_sizes(out) == {64}, k
        assert sorted(summary["done"] + summary["skipped"]) == sorted(i.slide_id for i in inputs)
        # and the run with the other settings, resumed, ends whole too
        prepare_dataset(inputs, out, PrepareConfig(patch_size=128), progress=False)
        assert _patch_sizes(out) == {128}, k
        k += 1
    # 3 files per slide, then the datalist and the summary
    assert n_writes == 3 * len(inputs) + 2


def test_edited_or_missing_file_means_redo(tmp_path, synthetic_dataset):
    inputs = collect_inputs(manifest=synthetic_dataset.manifest)[:1]
    out = tmp_path / "out"
    prepare_dataset(inputs, out, PrepareConfig(patch_size=64), progress=False)
    table = out / inputs[0].slide_id / "patches.csv"
    table.write_text(table.read_text().replace(",64,", ",128,"))
    with pytest.raises(Exception, match="does not match the SHA-256"):
        load_prepared(table.parent)
    summary = prepare_dataset(inputs, out, PrepareConfig(patch_size=64), progress=False)
    assert summary["done"] == [inputs[0].slide_id] and _patch_sizes(out) == {64}
    (out / inputs[0].slide_id / "tissue_mask.png").unlink()
    summary = prepare_dataset(inputs, out, PrepareConfig(patch_size=64), progress=False)
    assert summary["done"] == [inputs[0].slide_id]


# ----------------------------------------------------------------------------------- 6. the README's two-split recipe
def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_dataset_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run_script(capsys, *args: str) -> _Result:
    """``python scripts/prepare_dataset.py ARGS`` through fire, in this process (a subprocess per call costs
    the torch/MONAI import each time)."""
    import fire

    capsys.readouterr()
    code = 0
    try:
        fire.Fire(_load_script().main, command=list(args), name="prepare_dataset.py")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def test_readme_two_split_recipe_merges_the_splits(tmp_path, synthetic_dataset, capsys):
    """bundle/docs/README.md: ``--split training`` then ``--split validation`` into one ``--output_dir``; the second
    run used to leave a datalist with only ``validation`` (training then failed with KeyError)."""
    readme = (REPO / "bundle" / "docs" / "README.md").read_text()
    assert "--split training --output_dir prepared" in readme and "--split validation --output_dir prepared" in readme
    train, val = tmp_path / "train_slides", tmp_path / "val_slides"
    xml = tmp_path / "xml"
    for d in (train, val, xml):
        d.mkdir()
    for rec in synthetic_dataset.records:
        folder = train if rec["split"] in ("train", "training") else val
        (folder / Path(rec["image"]).name).symlink_to(rec["image"])
        (xml / f"{Path(rec['image']).stem}.xml").symlink_to(rec["asap_xml"])
    out = tmp_path / "prepared"
    for folder, split in ((train, "training"), (val, "validation")):
        res = _run_script(capsys, "--slides", str(folder), "--annotations", str(xml), "--split", split,
                          "--output_dir", str(out), "--patch_size", "64")
        assert res.returncode == 0, res.stderr[-2000:]
    datalist = _datalist(out)
    assert set(datalist) == {"training", "validation"}
    n_train = sum(r["split"] in ("train", "training") for r in synthetic_dataset.records)
    assert len({i["slide_id"] for i in datalist["training"]}) == n_train
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["slides"]) == {Path(r["image"]).stem for r in synthetic_dataset.records}
    assert f"{n_train} from earlier runs kept" in res.stdout
    # the bundle's training datalist loader reads both splits
    from monai_wsi_ext.data.patches import load_datalist

    assert load_datalist(str(out / "datalist.json"), "training") and load_datalist(str(out / "datalist.json"),
                                                                                   "validation")
    # a slide given again under another split is an error naming it (exit 2), the folder unchanged
    res = _run_script(capsys, "--slides", str(train), "--annotations", str(xml), "--split", "validation",
                      "--output_dir", str(out), "--patch_size", "64")
    assert res.returncode == 2 and "another split" in res.stderr and "training" in res.stderr, res.stderr[-2000:]
    assert _datalist(out) == datalist


# ------------------------------------------------------------------------------- 7-9 wired into the prepare step
def test_summary_carries_every_warning_and_status(tmp_path, synthetic_dataset, shared_data):
    """A training slide without annotation, an annotation file that matches no slide and a slide without tissue:
    each is in ``summary.json`` (not only a log line), with the no-tissue slide's status."""
    from monai_wsi_ext.prep.prepare import run_prepare

    slides, anns = tmp_path / "slides", tmp_path / "anns"
    slides.mkdir()
    anns.mkdir()
    rec = synthetic_dataset.records[0]
    (slides / "labelled.tif").symlink_to(rec["image"])
    (anns / "labelled.xml").symlink_to(rec["asap_xml"])
    (slides / "unlabelled.tif").symlink_to(rec["image"])
    (slides / "blank.tif").symlink_to(shared_data / "slides" / "kidney-48-5.tif")
    (anns / "typo_name.xml").symlink_to(rec["asap_xml"])
    out = tmp_path / "out"
    summary = run_prepare(out, PrepareConfig(patch_size=64), slides=str(slides), annotations=str(anns),
                          split="training", progress=False)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["warnings"] == json.loads(json.dumps(summary["warnings"]))
    warnings = on_disk["warnings"]
    assert any("typo_name.xml" in w and "matches no slide" in w for w in warnings["dataset"])
    assert any("not declared negative" in w for w in warnings["unlabelled"])
    assert on_disk["slides"]["blank"]["status"] == "no_tissue"
    assert any("no tissue" in w for w in warnings["blank"])
    assert on_disk["slides"]["labelled"]["status"] == "ok" and on_disk["slides"]["labelled"]["counts"]["tumor"] > 0
    meta = json.loads((out / "unlabelled" / "meta.json").read_text())
    assert meta["status"] == "ok" and any("not declared negative" in w for w in meta["warnings"])


def test_negative_flag_and_timeout_from_the_script(tmp_path, synthetic_dataset, capsys):
    """``--negative`` declares slides tumor-free; ``--slide_timeout_s`` fails a slide that takes too long, the
    batch goes on and the exit status is 1."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, rec in enumerate(synthetic_dataset.records[:2]):
        (slides / f"s{i}.tif").symlink_to(rec["image"])
    out = tmp_path / "out"
    res = _run_script(capsys, "--slides", str(slides), "--negative", "[s0]", "--output_dir", str(out),
                      "--patch_size", "64")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slides"]["s0"]["counts"]["normal"] > 0 and summary["slides"]["s0"]["counts"]["tumor"] == 0
    assert any("not declared negative" in w for w in summary["warnings"]["s1"])
    res = _run_script(capsys, "--slides", str(slides), "--output_dir", str(tmp_path / "out2"), "--patch_size", "64",
                      "--slide_timeout_s", "1e-6")
    assert res.returncode == 1 and "FAILED s0" in res.stdout and "FAILED s1" in res.stdout, res.stdout[-2000:]
    assert "Traceback" not in res.stderr
    res = _run_script(capsys, "--slides", str(slides), "--output_dir", str(tmp_path / "out3"), "--mpp", "-1")
    assert res.returncode == 2 and "mpp" in res.stderr and "Traceback" not in res.stderr


def test_ink_is_excluded_by_default_and_the_option_reaches_detection(tmp_path, synthetic_dataset, monkeypatch):
    import monai_wsi_ext.prep.prepare as prep

    seen = []
    real = prep.detect_tissue
    monkeypatch.setattr(prep, "detect_tissue", lambda *a, **k: seen.append(k["exclude_ink"]) or real(*a, **k))
    inp = SlideInput(image=synthetic_dataset.records[0]["image"], split="test")
    prep.prepare_in_memory(inp, PrepareConfig(patch_size=64)).close()
    prep.prepare_in_memory(inp, PrepareConfig(patch_size=64, exclude_ink=False)).close()
    assert seen == [True, False]
    assert PrepareConfig().fingerprint() == PrepareConfig(slide_timeout_s=5).fingerprint()
    assert PrepareConfig().fingerprint() != PrepareConfig(exclude_ink=False).fingerprint()


def test_prepare_bundle_config_runs_with_the_shared_settings(tmp_path, synthetic_dataset):
    """``prepare.json`` runs the same step with ``common.json#prepare``; a mistyped key is refused."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str([str(REPO / "bundle/configs/common.json"), str(REPO / "bundle/configs/prepare.json")]),
           "--manifest", str(synthetic_dataset.manifest), "--output_dir", str(tmp_path / "out"), "--patch_size", "64"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(_datalist(tmp_path / "out")) == {"training", "validation"} and _patch_sizes(tmp_path / "out") == {64}
    res = subprocess.run(cmd[:-2] + ["--patch_sise", "64"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 2 and "patch_size" in res.stderr


def test_inference_on_new_slides_honours_the_slide_timeout(synthetic_dataset):
    """``prepare#slide_timeout_s`` also bounds inference's in-memory preparation: the slide becomes a recorded
    failure (the evaluator skips it and the run ends non-zero), the other slides go on."""
    from monai_wsi_ext.inference.slides import SlideDataset

    image = synthetic_dataset.records[0]["image"]
    late = SlideDataset(slides=[image], prepare={"patch_size": 64, "slide_timeout_s": 1e-6})[0]
    assert "error" in late and "SlideTimeoutError" in late["error"] and image in late["error"]
    ok = SlideDataset(slides=[image], prepare={"patch_size": 64, "slide_timeout_s": 600})[0]
    assert "error" not in ok and len(ok["prepared"].grid) > 0


def test_unknown_prepare_setting_is_named():
    """A mistyped key in a ``prepare`` section (an overlay, or ``--prepare#tumour_threshold``) is a ConfigError
    listing the known settings, in prepare.json, prepare_dataset.py and inference alike (was a TypeError)."""
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.inference.slides import SlideDataset
    from monai_wsi_ext.prep.prepare import prepare_config

    with pytest.raises(ConfigError, match="tumour_threshold.*tumor_threshold"):
        prepare_config({"tumour_threshold": 0.3})
    with pytest.raises(ConfigError, match="tumour_threshold"):
        SlideDataset(slides=[str(REPO / "none.tif")], prepare={"tumour_threshold": 0.3})
    cfg = PrepareConfig(patch_size=64)
    assert prepare_config(cfg) is cfg and prepare_config(None) == PrepareConfig()
