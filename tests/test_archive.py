"""Batch inference over an archive (``scripts/batch_inference.py``, ``monai_wsi_ext.inference.archive``): listing
(folder, glob, CSV), what a rerun does (new, changed, failed, model changed, outputs missing), the index (CSV and
JSON), and the same command in one process and under ``torchrun`` with 2 CPU processes."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
FILES = [str(CONFIGS / n) for n in ("common.json", "inference.json", "archive_inference.json")] + \
    [str(REPO / "configs" / "datasets" / "demo.json")]


# -- listing ----------------------------------------------------------------------------------------------------------

def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_list_archive_folder_glob_and_csv(tmp_path):
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.inference.archive import list_archive

    root = tmp_path / "archive"
    _touch(root / "2024" / "a.svs")
    _touch(root / "2024" / "a_mask.tif")  # an annotation mask, not a slide
    _touch(root / "2025" / "b.tif")
    _touch(root / "2025" / "notes.txt")
    assert [(s["slide_id"], Path(s["image"]).name) for s in list_archive(root)] == [("a", "a.svs"), ("b", "b.tif")]
    assert [s["slide_id"] for s in list_archive(str(root / "2025" / "*.tif"))] == ["b"]
    assert [s["slide_id"] for s in list_archive(str(root / "**" / "*.svs"))] == ["a"]
    table = tmp_path / "slides.csv"
    table.write_text("image,slide_id\narchive/2024/a.svs,case-1\n" + f"{root / '2025' / 'b.tif'},\n")
    assert [(s["slide_id"], s["image"]) for s in list_archive(table)] == [
        ("b", str((root / "2025" / "b.tif").resolve())), ("case-1", str((root / "2024" / "a.svs").resolve()))]

    _touch(root / "2026" / "a.tif")
    with pytest.raises(ConfigError, match="repeat.*slide_id"):
        list_archive(root)
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(ConfigError, match=r"bad\.csv.*`image`"):
        list_archive(bad)
    bad.write_text("image\nmissing.svs\n")
    with pytest.raises(ConfigError, match=r"bad\.csv, line 2.*missing\.svs"):
        list_archive(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        list_archive(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no slides found"):
        list_archive(str(tmp_path / "*.ndpi"))


def test_list_archive_finds_dicom_series(tmp_path):
    """A DICOM WSI series folder in the archive is one slide (id: the folder's name) next to the slide files; its
    signature covers its instance files (a touched instance changes it, the same content keeps its SHA-256)."""
    pytest.importorskip("wsidicomizer")
    from monai_wsi_ext.inference.archive import file_signature, list_archive
    from monai_wsi_ext.testing.dicom import dicomize
    from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide

    root = tmp_path / "archive"
    tif = root / "tiff" / "s1.tif"
    generate_slide(tif, seed=3, config=SyntheticSlideConfig(width=512, height=512, patch_size=64, n_lumps=1))
    series = dicomize(tif, root / "dicom" / "s1_dicom")
    slides = list_archive(root)
    assert [(s["slide_id"], Path(s["image"]).name) for s in slides] == [("s1", "s1.tif"), ("s1_dicom", "s1_dicom")]
    before = file_signature(series, sha256=True)
    instance = sorted(p for p in series.iterdir() if p.is_file())[0]
    os.utime(instance, ns=(instance.stat().st_atime_ns, instance.stat().st_mtime_ns + 10**9))
    after = file_signature(series, sha256=True)
    assert after["mtime_ns"] != before["mtime_ns"] and after["sha256"] == before["sha256"]
    assert after["size_bytes"] == sum(p.stat().st_size for p in series.iterdir() if p.is_file())


def test_plan_archive_redoes_only_what_changed(tmp_path):
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.inference.archive import file_signature, list_archive, plan_archive
    from monai_wsi_ext.utils import file_sha256

    slide = _touch(tmp_path / "slides" / "s.tif", b"pixels-1")
    out = tmp_path / "out"
    _touch(out / "heatmaps" / "s" / "s_record.json", b"{}")

    def entry(**kw):
        e = {"slide_id": "s", "image": str(slide.resolve()), "status": "ok", "model_key": "K",
             **file_signature(slide, sha256=True), **kw}
        _touch(out / "index_entries" / "s.json", json.dumps(e).encode())

    def why(key="K", checksum="stat"):
        _, reasons = plan_archive(list_archive(tmp_path / "slides"), out, key, checksum)
        return reasons.get("s")

    assert why() == "new"
    entry()
    assert why() is None and why(checksum="sha256") is None
    assert why(key="other") == "model or settings changed"
    entry(status="failed")
    assert why() == "retry (failed)"
    entry()
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 10**9))  # touched, same content
    assert why() == "changed"
    assert why(checksum="sha256") is None
    # the entry took the new time stamp, so the next stat check passes without hashing
    assert json.loads((out / "index_entries" / "s.json").read_text())["mtime_ns"] == slide.stat().st_mtime_ns
    assert why() is None
    slide.write_bytes(b"pixels-2")
    assert why(checksum="sha256") == "changed" and file_sha256(slide) != json.loads(
        (out / "index_entries" / "s.json").read_text())["sha256"]
    entry()
    (out / "heatmaps" / "s" / "s_record.json").unlink()
    assert why() == "outputs missing"
    with pytest.raises(ConfigError, match="checksum"):
        why(checksum="md5")


# -- runs -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three generated 1024 px slides in an archive folder, and random encoder and U-Net checkpoints."""
    from monai.bundle import ConfigParser

    from monai_wsi_ext.testing.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("archive")
    manifest = generate_dataset(root / "data", n_train=2, n_val=1, n_test=0, seed=5, width=1024, height=1024,
                                patch_size=64, n_lumps=2)
    slides = root / "slides"
    slides.mkdir()
    for rec in json.loads(Path(manifest).read_text())["slides"]:
        shutil.copy(Path(manifest).parent / rec["image"], slides / Path(rec["image"]).name)
    parser = ConfigParser()
    parser.read_config(FILES[:1] + FILES[-1:])
    models = root / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("encoder_def").state_dict(), models / "encoder.pt")
    torch.save(parser.get_parsed_content("unet_def").state_dict(), models / "unet.pt")
    return {"slides": slides, "overrides": {"ckpt_dir": str(models), "canvas_size": 32, "num_workers": 0}}


def _index_csv(out: Path) -> dict[str, dict]:
    with open(out / "index.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_archive_run_single_process_incremental(archive, tmp_path, caplog):
    from monai_wsi_ext.errors import MonaiWsiExtError
    from monai_wsi_ext.inference.archive import INDEX_COLUMNS, run_archive

    slides = tmp_path / "slides"
    shutil.copytree(archive["slides"], slides)
    out = tmp_path / "out"
    ids = sorted(p.stem for p in slides.iterdir())
    with caplog.at_level(logging.INFO):
        first = run_archive(slides, out, FILES, archive["overrides"])
    assert first["todo"] == {s: "new" for s in ids}
    assert any("ETA" in r.getMessage() for r in caplog.records)
    index = json.loads((out / "index.json").read_text())
    assert index["counts"] == {"ok": 3} and [r["slide_id"] for r in index["slides"]] == ids
    rows = _index_csv(out)
    assert list(next(iter(rows.values()))) == list(INDEX_COLUMNS)
    for sid, r in rows.items():
        record = json.loads(Path(r["record_json"]).read_text())
        assert r["status"] == "ok" and float(r["slide_score"]) == pytest.approx(record["slide_score"])
        assert r["slide_class"] == ("tumor" if record["slide_score"] >= 0.5 else "normal")
        assert all(Path(r[k]).is_file() for k in ("prob_npy", "heatmap_tiff", "tumor_geojson", "overlay_png"))
        assert int(r["size_bytes"]) == (slides / f"{sid}.tif").stat().st_size and r["listed"] == "True"
    stamps = {s: Path(rows[s]["record_json"]).stat().st_mtime_ns for s in ids}

    # nothing changed: nothing is done
    again = run_archive(slides, out, FILES, archive["overrides"])
    assert again["todo"] == {} and again["index"]["counts"] == {"ok": 3}
    assert {s: Path(rows[s]["record_json"]).stat().st_mtime_ns for s in ids} == stamps

    # one slide rewritten, one new slide, one broken file, one slide gone from the listing
    changed, gone = ids[0], ids[2]
    data = (slides / f"{changed}.tif").read_bytes()
    (slides / f"{changed}.tif").unlink()
    (slides / f"{changed}.tif").write_bytes(data)
    os.utime(slides / f"{changed}.tif", ns=(0, stamps[changed] + 10**9))
    shutil.move(slides / f"{gone}.tif", slides / "new_slide.tif")
    (slides / "broken.tif").write_bytes(b"II*\x00 not a slide")
    with pytest.raises(MonaiWsiExtError, match="1 slide.*failed.*broken"):
        run_archive(slides, out, FILES, archive["overrides"])
    index = json.loads((out / "index.json").read_text())
    by_id = {r["slide_id"]: r for r in index["slides"]}
    assert index["counts"] == {"ok": 3, "failed": 1}
    assert by_id["broken"]["status"] == "failed" and by_id["broken"]["error"]
    assert by_id["new_slide"]["status"] == "ok" and by_id[gone]["listed"] is False
    assert Path(by_id[changed]["record_json"]).stat().st_mtime_ns != stamps[changed]
    assert Path(by_id[ids[1]]["record_json"]).stat().st_mtime_ns == stamps[ids[1]]
    # the failed slide is retried (and fails again), the others stand
    plan = run_archive(slides, out, FILES, archive["overrides"], dry_run=True)
    assert plan["todo"] == {"broken": "retry (failed)"}
    # another model: every slide again
    plan = run_archive(slides, out, FILES, {**archive["overrides"], "mode": "classifier"}, dry_run=True)
    assert set(plan["todo"]) == set(plan["listed"]) and set(plan["todo"].values()) >= {"model or settings changed"}


def test_archive_command_under_torchrun_matches_one_process(archive, tmp_path):
    from monai_wsi_ext.inference.archive import run_archive

    single, multi = tmp_path / "single", tmp_path / "multi"
    run_archive(archive["slides"], single, FILES, archive["overrides"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "batch_inference.py"), "run", "--slides", str(archive["slides"]),
           "--output_dir", str(multi), "--config_file", FILES[-1]]
    for k, v in archive["overrides"].items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-4000:])
    assert json.loads(res.stdout.strip().splitlines()[-1])["counts"] == {"ok": 3}  # printed once, by rank 0
    rows, ref = _index_csv(multi), _index_csv(single)
    assert sorted(rows) == sorted(ref) and all(r["status"] == "ok" for r in rows.values())
    assert {r["rank"] for r in rows.values()} == {"0", "1"}, "the slides were not dealt out over both ranks"
    for sid, r in rows.items():
        np.testing.assert_allclose(np.load(r["prob_npy"]), np.load(ref[sid]["prob_npy"]), rtol=0, atol=1e-5,
                                   equal_nan=True)
        assert float(r["slide_score"]) == pytest.approx(float(ref[sid]["slide_score"]), abs=1e-5)


def test_archive_refuses_unknown_and_ill_typed_overrides(archive, tmp_path):
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.inference.archive import run_archive

    with pytest.raises(ConfigError, match="unknown key `treshold`"):
        run_archive(archive["slides"], tmp_path, FILES, {**archive["overrides"], "treshold": 0.3}, dry_run=True)
    with pytest.raises(ConfigError, match="progress_bar"):
        run_archive(archive["slides"], tmp_path, FILES, {**archive["overrides"], "progress_bar": "true"}, dry_run=True)
    assert not (tmp_path / "index.json").exists()


def test_cli_reports_a_bad_archive_without_traceback(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("batch_inference", REPO / "scripts" / "batch_inference.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as stop:
        cli.plan(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert stop.value.code == 1
    assert "error: `slides` must be a folder" in capsys.readouterr().err
