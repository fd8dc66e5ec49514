"""Crash-safe outputs (issue 8, item 4): every file the runtime writes besides checkpoints (heatmaps, records,
overlays, label grids, feature files, summaries, metrics, exports) is written to a temporary file and renamed; a full
disk or an interrupt leaves nothing under the final name and no temporary file, and the error names the path;
temporary files of a killed run are removed by the next run; a slide folder without its record (written last) is
incomplete, and the evaluation skips and lists it, or fails clearly when no slide is complete."""

from __future__ import annotations

import errno
import json
import logging
import os
import types
from pathlib import Path

import numpy as np
import pytest

from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.io import atomic
from monai_wsi_ext.io.atomic import (
    AtomicWriteError,
    is_temporary_name,
    remove_stale_temporaries,
    write_json_atomic,
    write_npy_atomic,
    write_npz_atomic,
)
from monai_wsi_ext.outputs import writers

CELL = 64


def _grid() -> np.ndarray:
    prob = np.full((6, 8), np.nan, np.float32)
    prob[1:5, 1:7] = 0.1
    prob[2:4, 2:4] = 0.9
    return prob


def _labels(prob: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(prob), -2, (prob > 0.5).astype(np.int64)).astype(np.int64)


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _break_writes(monkeypatch, under: Path, exc: BaseException, only: str | None = None) -> list[str]:
    """Make ``os.write`` to files below ``under`` (whose name contains ``only``, when given) write half of the
    data and then raise ``exc``: a disk that fills up, or an interrupt, in the middle of a write. Returns the files
    it broke."""
    real_write = os.write
    broken: list[str] = []

    def write(fd, data):
        name = _fd_name(fd)
        if name.startswith(str(under)) and (only is None or only in Path(name).name):
            view = memoryview(data).cast("B")
            real_write(fd, view[: max(1, len(view) // 2)])
            broken.append(name)
            raise exc
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return broken


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# -- the writers themselves ----------------------------------------------------------------------------------------

_WRITERS = {
    "json": ("summary.json", lambda p: write_json_atomic(p, {"a": list(range(1000))})),
    "npy": ("t_prob.npy", lambda p: writers.write_prob_npy(p, _grid())),
    "labels": ("t_labels.npy", lambda p: write_npy_atomic(p, _labels(_grid()))),
    "npz": ("t.npz", lambda p: write_npz_atomic(p, features=np.ones((300, 16), np.float32), split=np.str_("x"))),
    "png": ("t_prob.png", lambda p: writers.write_prob_png(p, _grid(), scale=8)),
    "tiff": ("t_heatmap.tif", lambda p: writers.write_heatmap_tiff(p, _grid(), CELL, (8 * CELL, 6 * CELL))),
    "geojson": ("t_tumor.geojson", lambda p: writers.write_regions_geojson(p, writers.tumor_regions(_grid(), CELL))),
    "record": ("t_record.json", lambda p: writers.write_run_record(p, config={"k": 1})),
}


@pytest.mark.parametrize("kind", sorted(_WRITERS))
def test_full_disk_leaves_nothing_and_names_the_path(tmp_path, monkeypatch, kind):
    name, write = _WRITERS[kind]
    path = tmp_path / "out" / name
    broken = _break_writes(monkeypatch, tmp_path, _enospc())
    with pytest.raises(OSError, match="No space left on device") as info:
        write(path)
    assert broken, "the write did not go through os.write"
    assert isinstance(info.value, AtomicWriteError) and info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value)
    assert _files(path.parent) == []  # no file under the final name, no temporary file


@pytest.mark.parametrize("kind", ["json", "npz", "png", "tiff"])
def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, kind):
    name, write = _WRITERS[kind]
    path = tmp_path / name
    write(path)
    before = path.read_bytes()
    _break_writes(monkeypatch, tmp_path, _enospc())
    with pytest.raises(AtomicWriteError, match="No space left on device"):
        write(path)
    assert path.read_bytes() == before and _files(tmp_path) == [name]


@pytest.mark.parametrize("kind", ["json", "npy", "png"])
def test_keyboard_interrupt_during_a_write_leaves_no_temporary_file(tmp_path, monkeypatch, kind):
    name, write = _WRITERS[kind]
    path = tmp_path / name
    _break_writes(monkeypatch, tmp_path, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write(path)
    assert _files(tmp_path) == []


def test_error_is_picklable_and_other_errors_pass_unchanged(tmp_path):
    import pickle

    err = AtomicWriteError(tmp_path / "x.json", _enospc())
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.errno == errno.ENOSPC and back.path == str(tmp_path / "x.json")
    with pytest.raises(ValueError, match="boom"), atomic.atomic_open(tmp_path / "y.bin") as f:
        f.write(b"partial")
        raise ValueError("boom")
    assert _files(tmp_path) == []


# -- stale temporary files -----------------------------------------------------------------------------------------

def test_remove_stale_temporaries_matches_only_the_atomic_pattern(tmp_path):
    stale = [".meta.json.k2j4x9_a.json", ".train_003_overlay.png.3m_q0zzt.png", ".s1.npz.abcdefgh.npz"]
    user = [".bashrc", "notes.json", ".cache.settings", ".x.json.abcdefgh.png", ".meta.json.SHORT.json",
            "meta.json.k2j4x9_a.json", ".meta.json.k2j4x9_aa.json"]
    for name in stale + user:
        (tmp_path / name).write_text("x")
    (tmp_path / ".sub.json.abcdefgh.json").mkdir()  # a folder with a temporary-looking name stays
    os.symlink(tmp_path / "notes.json", tmp_path / ".link.json.abcdefgh.json")  # and a link
    assert all(is_temporary_name(n) for n in stale) and not any(is_temporary_name(n) for n in user)
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert _files(tmp_path) == sorted(user + [".link.json.abcdefgh.json", ".sub.json.abcdefgh.json"])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_the_writer_names_its_temporaries_as_the_pattern_says(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    writers.write_prob_png(tmp_path / "train_003_overlay.png", _grid())
    write_json_atomic(tmp_path / "meta.json", {})
    assert len(seen) == 2 and all(is_temporary_name(n) for n in seen)


def test_slide_outputs_rerun_removes_stale_temporaries(tmp_path):
    out = tmp_path / "s1"
    out.mkdir()
    for name in (".s1_overlay.png.k2j4x9_a.png", ".s1_record.json.abcdefgh.json"):
        (out / name).write_bytes(b"half")
    writers.write_slide_outputs(out, "s1", _grid(), CELL, (8 * CELL, 6 * CELL), None, None, None,
                                labels=_labels(_grid()))
    assert not [n for n in _files(out) if n.startswith(".")]


# -- a slide's outputs: complete or marked incomplete ----------------------------------------------------------

def _record_order(monkeypatch) -> list[str]:
    order: list[str] = []
    real_replace = os.replace

    def replace(src, dst):
        order.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return order


def test_record_is_written_last_and_covers_the_label_grid(tmp_path, monkeypatch):
    order = _record_order(monkeypatch)
    thumb = np.full((6 * 4, 8 * 4, 3), 220, np.uint8)
    res = writers.write_slide_outputs(tmp_path / "s", "s", _grid(), CELL, (8 * CELL, 6 * CELL), 0.5, thumb, 16.0,
                                      labels=_labels(_grid()))
    assert order[-1] == "s_record.json" and "s_labels.npy" in order[:-1]
    np.testing.assert_array_equal(np.load(res["labels_npy"]), _labels(_grid()))
    assert json.loads(res["record_json"].read_text())["outputs"]["labels_npy"] == "s_labels.npy"
    with pytest.raises(ValueError, match="labels"):
        writers.write_slide_outputs(tmp_path / "t", "t", _grid(), CELL, (8 * CELL, 6 * CELL), None, None, None,
                                    labels=np.zeros((2, 2), np.int64))


def test_failed_rerun_leaves_the_slide_marked_incomplete(tmp_path, monkeypatch):
    """A rerun over a complete slide folder that dies half way (full disk, Ctrl-C) must not leave the old record
    vouching for a mix of old and new files."""
    thumb = np.full((6 * 4, 8 * 4, 3), 220, np.uint8)
    args = ("s", _grid(), CELL, (8 * CELL, 6 * CELL), 0.5, thumb, 16.0)
    writers.write_slide_outputs(tmp_path / "s", *args, labels=_labels(_grid()))
    assert (tmp_path / "s" / "s_record.json").is_file()
    for exc, raised in ((_enospc(), AtomicWriteError), (KeyboardInterrupt(), KeyboardInterrupt)):
        with monkeypatch.context() as m:
            _break_writes(m, tmp_path, exc, only="_overlay.png")
            with pytest.raises(raised):
                writers.write_slide_outputs(tmp_path / "s", *args, labels=_labels(_grid()))
        names = _files(tmp_path / "s")
        assert "s_record.json" not in names and not [n for n in names if n.startswith(".")]
    writers.write_slide_outputs(tmp_path / "s", *args, labels=_labels(_grid()))  # the rerun redoes the slide
    assert (tmp_path / "s" / "s_record.json").is_file()
    # a rerun that writes no label grid / overlay leaves none of the earlier run's (the evaluation would read it)
    writers.write_slide_outputs(tmp_path / "s", "s", _grid(), CELL, (8 * CELL, 6 * CELL), 0.5, None, None)
    names = _files(tmp_path / "s")
    assert "s_labels.npy" not in names and "s_overlay.png" not in names and "s_record.json" in names


def _fake_slide(root: Path, sid: str, split: str = "training"):
    """A prepared slide as the inference and feature code see it (grid, size, thumbnail), without a slide file."""
    from monai_wsi_ext.prep.grid import PatchGrid

    rows, cols = np.nonzero(~np.isnan(_grid()))
    labels = (_grid()[rows, cols] > 0.5).astype(np.int64)
    grid = PatchGrid(slide_id=sid, level=0, patch_size=CELL, cell_size=float(CELL), shape=_grid().shape,
                     rows=rows, cols=cols, tissue=np.ones(len(rows), np.float32), labels=labels)
    folder = root / "prepared" / sid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "patches.csv").write_text(f"{sid}\n")
    thumb = np.full((6 * 4, 8 * 4, 3), 220, np.uint8)
    slide = types.SimpleNamespace(thumbnail=lambda max_size=2048: (thumb, 16.0))
    return types.SimpleNamespace(slide_id=sid, grid=grid, dir=str(folder), split=split, image=str(folder / "x.tif"),
                                 mpp=0.5, dimensions=(8 * CELL, 6 * CELL), open=lambda backend="auto": slide,
                                 close=lambda: None)


def _engine(meta, probs):
    from monai.utils.enums import CommonKeys as Keys

    state = types.SimpleNamespace(batch=[{"prepared": meta, "slide_id": meta.slide_id}],
                                  output={Keys.PRED: {"probs": probs}})
    return types.SimpleNamespace(state=state)


def test_heatmap_writer_writes_the_record_last_and_reports_a_full_disk(tmp_path, monkeypatch):
    from monai_wsi_ext.outputs.handlers import HeatmapWriter

    meta = _fake_slide(tmp_path, "test_000")
    sid, out = meta.slide_id, tmp_path / "heatmaps"
    out.mkdir()
    (out / ".inference_summary.json.k2j4x9_a.json").write_text("{")  # left by a killed run
    writer = HeatmapWriter(str(out), thumbnail_size=256)
    engine = _engine(meta, np.linspace(0, 1, len(meta.grid), dtype=np.float32))
    writer._started(engine)
    assert _files(out) == []
    with monkeypatch.context() as m:
        order = _record_order(m)
        writer(engine)
    assert order[-1] == f"{sid}_record.json" and f"{sid}_labels.npy" in order
    np.testing.assert_array_equal(np.load(out / sid / f"{sid}_labels.npy"), meta.grid.label_grid())
    assert sid in engine.state.results and not engine.state.failed
    with monkeypatch.context() as m:
        _break_writes(m, tmp_path, _enospc(), only="_tumor.geojson")
        writer(engine)
    failure = engine.state.failed[sid]
    assert "No space left on device" in failure and str(out / sid / f"{sid}_tumor.geojson") in failure
    names = _files(out / sid)
    assert f"{sid}_record.json" not in names and not [n for n in names if n.startswith(".")]


# -- feature files -------------------------------------------------------------------------------------------------

def _fake_encoder(monkeypatch):
    """Feature extraction without reading patches or running a network: 4 features per patch."""
    import torch

    from monai_wsi_ext.data.patches import SlidePatchSource
    from monai_wsi_ext.model import predict as P

    def from_prepared(meta, *args, **kwargs):
        return types.SimpleNamespace(n=len(meta.grid), close=lambda: None)

    def encode(encoder, source, *args, **kwargs):
        n = source.n
        return np.arange(n * 4, dtype=np.float32).reshape(n, 4), np.linspace(0, 1, n, dtype=np.float32)

    monkeypatch.setattr(SlidePatchSource, "from_prepared", staticmethod(from_prepared))
    monkeypatch.setattr(P, "encode_slide", encode)  # what the feature extraction's CanvasInferer calls
    return torch.nn.Identity()


def test_feature_extraction_full_disk_and_stale_temporaries(tmp_path, monkeypatch):
    from monai_wsi_ext.data.features import CanvasDataset
    from monai_wsi_ext.inference import slides as S
    from monai_wsi_ext.inference.features import FeatureExtractor

    encoder = _fake_encoder(monkeypatch)
    slides = [_fake_slide(tmp_path, "train_000"), _fake_slide(tmp_path, "train_001")]
    monkeypatch.setattr(S, "load_prepared_slides", lambda prepared_dir, splits=None: slides)  # the SlideDataset's
    feat = tmp_path / "features"
    feat.mkdir()
    stale = feat / ".train_000.npz.k2j4x9_a.npz"  # a truncated feature file left by a kill
    stale.write_bytes(b"PK\x03\x04 truncated")
    ext = FeatureExtractor(str(tmp_path / "prepared"), str(feat), encoder, device="cpu", channels_last=False,
                           num_workers=0)
    with monkeypatch.context() as m:
        _break_writes(m, feat, _enospc(), only=".npz")
        with pytest.raises(MonaiWsiExtError, match="No space left on device") as info:
            ext.run()
    assert not stale.exists()
    assert _files(feat) == ["features_summary.json"]  # no feature file, no temporary file
    failed = json.loads((feat / "features_summary.json").read_text())
    assert failed["done"] == [] and sorted(failed["failed"]) == ["train_000", "train_001"]
    for sid, reason in failed["failed"].items():  # each failure says why and names its file
        assert "No space left on device" in reason and str(feat / f"{sid}.npz") in reason
        assert sid in str(info.value)
    summary = ext.run()  # the next run computes every slide
    assert sorted(summary["done"]) == sorted(failed["failed"]) and not summary["failed"]
    (feat / ".train_000.npz.abcdefgh.npz").write_bytes(b"PK\x03\x04 truncated")  # killed again: ignored
    ds = CanvasDataset(str(feat), canvas_size=32, train=False)
    assert {item["slide_id"] for item in ds.items} == set(summary["done"])


# -- export --------------------------------------------------------------------------------------------------------

def test_export_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import monai.bundle
    import torch

    from monai_wsi_ext.export.bundle import export_network

    def fake_ckpt_export(net_id, filepath, **kwargs):
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), filepath)

    monkeypatch.setattr(monai.bundle, "ckpt_export", fake_ckpt_export)
    ckpt = tmp_path / "unet.pt"
    ckpt.write_bytes(b"not read by the fake export")
    real_write_bytes = Path.write_bytes

    def full_disk(self, data):
        real_write_bytes(self, bytes(memoryview(data)[:10]))
        raise _enospc()

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "out" / "unet.ts"
    with pytest.raises(OSError, match="No space left on device") as info:
        export_network("unet", ckpt, out, bundle_root=Path(__file__).resolve().parents[1] / "bundle",
                       check_shape=())
    assert str(out) in str(info.value) and _files(out.parent) == []


# -- evaluation of a folder with incomplete slides -----------------------------------------------------------------

def _slide_folder(root: Path, sid: str, record: bool = True) -> None:
    d = root / sid
    d.mkdir(parents=True)
    prob = _grid()
    np.save(d / f"{sid}_prob.npy", prob)
    np.save(d / f"{sid}_labels.npy", _labels(prob))
    (d / f"{sid}_heatmap.tif").write_bytes(b"")
    if record:
        write_json_atomic(d / f"{sid}_record.json", {"slide_id": sid, "cell_size": CELL, "mpp": 0.5,
                                                     "slide_size": [8 * CELL, 6 * CELL]})


def test_evaluate_skips_and_reports_an_incomplete_slide(tmp_path, caplog):
    from monai_wsi_ext.evaluation.report import evaluate_heatmaps, incomplete_slides

    heat = tmp_path / "heatmaps"
    _slide_folder(heat, "test_001")
    _slide_folder(heat, "test_000", record=False)  # killed after the heatmap, before the record
    (heat / "test_002").mkdir()  # killed during its first write: only a temporary file
    (heat / "test_002" / ".test_002_prob.npy.abcdefgh.npy").write_bytes(b"\x93NUMPY")
    (heat / "notes").mkdir()  # not a slide folder
    (heat / ".metrics_overall.json.k2j4x9_a.json").write_text("{")  # an evaluation killed while writing
    assert sorted(incomplete_slides(heat)) == ["test_000", "test_002"]
    with caplog.at_level(logging.WARNING):
        result = evaluate_heatmaps(heat)
    assert [r["slide_id"] for r in result["per_slide"]] == ["test_001"]
    overall = result["overall"]
    assert overall["n_slides"] == 1 and overall["n_incomplete"] == 2
    assert sorted(overall["incomplete_slides"]) == ["test_000", "test_002"]
    assert "no test_000_record.json" in overall["incomplete_slides"]["test_000"]
    assert "test_000" in caplog.text and "incomplete" in caplog.text
    on_disk = json.loads((heat / "metrics_overall.json").read_text())
    assert on_disk["incomplete_slides"] == overall["incomplete_slides"]
    assert not [n for n in _files(heat) if n.startswith(".")]  # the stale metrics temporary is gone
    with pytest.raises(MonaiWsiExtError, match="incomplete slide folder"):
        evaluate_heatmaps(heat, write=False, on_incomplete="error")


def test_evaluate_with_no_complete_slide_fails_clearly(tmp_path):
    from monai_wsi_ext.evaluation.report import evaluate_heatmaps

    heat = tmp_path / "heatmaps"
    _slide_folder(heat, "test_000", record=False)
    with pytest.raises(MonaiWsiExtError, match="no complete slide") as info:
        evaluate_heatmaps(heat)
    assert "test_000" in str(info.value) and "no test_000_record.json" in str(info.value)
    assert "cell_size" not in str(info.value)
    assert not (heat / "metrics_overall.json").exists()


def test_evaluate_config_reports_incomplete_slides(tmp_path):
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    heat = tmp_path / "heatmaps"
    _slide_folder(heat, "test_001")
    _slide_folder(heat, "test_000", record=False)

    def workflow(**overrides):
        return ConfigWorkflow(config_file=[str(configs / "common.json"), str(configs / "evaluate.json")],
                              meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
                              workflow_type=None, heatmap_dir=str(heat), metrics_dir=str(tmp_path / "m"),
                              **overrides)

    wf = workflow()
    wf.initialize()
    wf.run()
    wf.finalize()
    overall = json.loads((tmp_path / "m" / "metrics_overall.json").read_text())
    assert overall["n_slides"] == 1 and list(overall["incomplete_slides"]) == ["test_000"]
    wf = workflow(on_incomplete="error")
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.run()
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("incomplete slide folder" in text and "test_000" in text for text in chain)
