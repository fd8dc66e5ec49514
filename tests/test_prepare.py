"""Tests of dataset preparation (monai_wsi_ext.prep.prepare and scripts/prepare_dataset.py): outputs, the MONAI datalist,
failure isolation, reruns, atomic writes, and labels from real Camelyon16 polygons on a stand-in slide."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_wsi_ext.io.annotations import (
    AnnotationLabel,
    AnnotationPolygon,
    rasterize_annotations,
    read_annotations,
    write_asap_xml,
)
from monai_wsi_ext.prep.grid import PatchLabel, read_patch_table
from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, collect_inputs, prepare_dataset, prepare_slide
from monai_wsi_ext.prep.tissue import load_mask_png
from monai_wsi_ext.io.wsi import open_slide

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_dataset.py"
ITEM_KEYS = {"image", "location", "size", "level", "label", "row", "col", "slide_id"}


def _leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or
                  p.name.endswith(".tmp"))


def _corrupt_slide(folder: Path) -> Path:
    path = folder / "corrupt.tif"
    path.write_bytes(b"II*\x00" + np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    return path


def _run_cli(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([python, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------------------------------------ outputs
def test_outputs_of_prepared_dataset(synthetic_dataset, prepared_dataset):
    out, summary = prepared_dataset
    ids = [r["id"] for r in synthetic_dataset.records]
    assert summary["done"] == ids and summary["skipped"] == [] and summary["failed"] == {}
    assert json.loads((out / "summary.json").read_text())["done"] == ids
    for rec in synthetic_dataset.records:
        folder = out / rec["id"]
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "patches.csv", "tissue_mask.png"]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["slide_id"] == rec["id"] and meta["dimensions"] == [1536, 1536]
        assert meta["grid_shape"] == [24, 24] and meta["cell_size"] == 64 and meta["level"] == 0
        assert meta["mpp"] == pytest.approx(0.5, abs=1e-3) and meta["mpp_source"] == "file"
        assert meta["annotation"] == str(Path(rec["asap_xml"]).resolve())
        grid = read_patch_table(folder / "patches.csv")
        assert meta["counts"]["cells"] == len(grid) > 50
        mask = load_mask_png(folder / "tissue_mask.png")
        assert mask.downsample == pytest.approx(meta["tissue_mask_downsample"])
        assert mask.mask.mean() == pytest.approx(meta["tissue_fraction"], abs=1e-6)
    assert _leftovers(out) == []


def test_datalist_items(synthetic_dataset, prepared_dataset):
    out, summary = prepared_dataset
    datalist = json.loads((out / "datalist.json").read_text())
    assert sorted(datalist) == ["training", "validation"]
    assert {d["slide_id"] for d in datalist["training"]} == {"train_000", "train_001"}
    assert {d["slide_id"] for d in datalist["validation"]} == {"val_000"}
    for split, items in datalist.items():
        for d in items:
            assert set(d) == ITEM_KEYS
            assert d["size"] == [64, 64] and d["level"] == 0 and d["label"] in (0, 1)
            assert d["location"] == [d["row"] * 64, d["col"] * 64]  # [y, x] of the top-left corner
            assert Path(d["image"]).is_absolute() and Path(d["image"]).is_file()
    for sid, info in summary["slides"].items():
        items = [d for v in datalist.values() for d in v if d["slide_id"] == sid]
        c = info["counts"]
        assert len(items) == c["tumor"] + c["normal"]  # nolabel cells are left out
        assert sum(d["label"] == 1 for d in items) == c["tumor"] > 0


def test_datalist_works_with_monai_patchwsidataset(prepared_dataset):
    from monai.data import PatchWSIDataset

    out, _ = prepared_dataset
    items = json.loads((out / "datalist.json").read_text())["training"]
    picks = [next(d for d in items if d["label"] == 1), next(d for d in items if d["label"] == 0), items[-1]]
    # our locations are top-left corners; MONAI 1.6 reads them as centres unless center_location=False
    ds = PatchWSIDataset(data=picks, patch_size=64, patch_level=0, reader="cuCIM", center_location=False)
    assert len(ds) == 3
    assert picks[0]["slide_id"] != picks[2]["slide_id"]  # two slides
    for i, d in enumerate(picks):
        sample = ds[i]
        img = np.asarray(sample["image"])
        assert img.shape == (3, 64, 64)
        assert int(np.asarray(sample["label"])) == d["label"]
        (y, x) = d["location"]
        with open_slide(d["image"], backend="cucim") as slide:
            np.testing.assert_array_equal(np.moveaxis(img, 0, -1), slide.read_region(x, y, 64, 64, 0))
    # the centred default reads the patch half a patch up and left of ours
    centred = np.asarray(PatchWSIDataset(data=picks[:1], patch_size=64, patch_level=0, reader="cuCIM")[0]["image"])
    (y, x) = picks[0]["location"]
    with open_slide(picks[0]["image"], backend="cucim") as slide:
        np.testing.assert_array_equal(np.moveaxis(centred, 0, -1), slide.read_region(x - 32, y - 32, 64, 64, 0))


# ------------------------------------------------------------------------------------------------ failures
def test_bad_slide_is_reported_and_others_finish(tmp_path, synthetic_dataset):
    bad = _corrupt_slide(tmp_path)
    inputs = collect_inputs(manifest=synthetic_dataset.manifest)[:2] + [SlideInput(image=str(bad))]
    out = tmp_path / "out"
    summary = prepare_dataset(inputs, out, PrepareConfig(patch_size=64, thumbnail_max_size=768), progress=False)
    assert summary["done"] == ["train_000", "train_001"]
    assert list(summary["failed"]) == ["corrupt"]
    assert "WSIReadError" in summary["failed"]["corrupt"] and str(bad) in summary["failed"]["corrupt"]
    assert not (out / "corrupt").exists()
    datalist = json.loads((out / "datalist.json").read_text())
    assert {d["slide_id"] for d in datalist["training"]} == {"train_000", "train_001"}
    assert _leftovers(out) == []


def test_cli_exits_nonzero_on_failure(tmp_path, synthetic_dataset, venv_python):
    bad = _corrupt_slide(tmp_path)
    good = synthetic_dataset.slide(0)
    out = tmp_path / "cli"
    r = _run_cli(venv_python, "--slides", f"[{good},{bad}]", "--output_dir", str(out), "--patch_size", "64",
                 "--thumbnail_max_size", "768", "--log_level", "WARNING", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 slide(s)" in r.stdout and "1 done" in r.stdout and "1 failed" in r.stdout
    assert "FAILED corrupt" in r.stdout and str(bad) in r.stdout
    assert "training:" in r.stdout and f"datalist: {out / 'datalist.json'}" in r.stdout
    assert (out / "train_000" / "meta.json").exists() and not (out / "corrupt").exists()
    assert _leftovers(out) == []


def test_cli_main_in_process(tmp_path, synthetic_dataset, capsys):
    spec = importlib.util.spec_from_file_location("prepare_dataset_cli", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    kwargs = dict(output_dir=str(out), patch_size=64, thumbnail_max_size=768, log_level="WARNING", split="val")
    cli.main(slides=f"[{synthetic_dataset.slide(0)}, {synthetic_dataset.slide(1)}]", **kwargs)  # no SystemExit
    text = capsys.readouterr().out
    assert "2 slide(s)" in text and "2 done, 0 skipped" in text and "0 failed" in text
    assert "validation:" in text  # split names are normalised
    cli.main(slides=str(synthetic_dataset.slide(0)), **kwargs)
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert list(json.loads((out / "datalist.json").read_text())) == ["validation"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(slides=str(tmp_path / "missing_slide.tif"), **kwargs)
    assert exit_info.value.code == 1
    assert "FAILED missing_slide: WSIReadError" in capsys.readouterr().out


def test_cli_help_and_missing_inputs(tmp_path, venv_python):
    r = _run_cli(venv_python, "--help", cwd=tmp_path)  # from another folder: the package comes from the venv
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    for flag in ("--slides", "--manifest", "--patch_size", "--target_mpp", "--overwrite", "--exhaustive"):
        assert flag in text
    r = _run_cli(venv_python, "--output_dir", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 2 and "--slides" in r.stderr


# ------------------------------------------------------------------------------------------------ reruns
def test_rerun_skips_unless_overwrite(tmp_path, synthetic_dataset):
    inputs = collect_inputs(manifest=synthetic_dataset.manifest)[2:]
    cfg = PrepareConfig(patch_size=64, thumbnail_max_size=768)
    out = tmp_path / "out"
    first = prepare_dataset(inputs, out, cfg, progress=False)
    assert first["done"] == ["val_000"]
    meta_path = out / "val_000" / "meta.json"
    stamp = meta_path.stat().st_mtime_ns
    datalist = json.loads((out / "datalist.json").read_text())
    (out / "datalist.json").unlink()
    second = prepare_dataset(inputs, out, cfg, progress=False)
    assert second["done"] == [] and second["skipped"] == ["val_000"]
    assert meta_path.stat().st_mtime_ns == stamp
    assert second["slides"] == first["slides"]
    assert json.loads((out / "datalist.json").read_text()) == datalist  # rebuilt from the kept outputs
    third = prepare_dataset(inputs, out, cfg, overwrite=True, progress=False)
    assert third["done"] == ["val_000"] and third["skipped"] == []
    # other settings: not the same preparation, so not skipped
    fourth = prepare_dataset(inputs, out, PrepareConfig(patch_size=128, thumbnail_max_size=768), progress=False)
    assert fourth["done"] == ["val_000"]
    assert json.loads(meta_path.read_text())["grid_shape"] == [12, 12]
    assert _leftovers(out) == []


# ------------------------------------------------------------------------------------------------ Camelyon16
def _fit_polygons(polygons: list[AnnotationPolygon], size: int, margin: int) -> list[AnnotationPolygon]:
    """Scale and shift polygons uniformly so that their joint bounding box fits ``[margin, size - margin]``."""
    pts = np.concatenate([p.exterior for p in polygons] + [h for p in polygons for h in p.holes])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = (size - 2 * margin) / float((hi - lo).max())

    def fit(ring):
        return (ring - lo) * scale + margin

    return [AnnotationPolygon(exterior=fit(p.exterior), holes=[fit(h) for h in p.holes], label=p.label, name=p.name,
                              group=p.group) for p in polygons]


def test_camelyon16_annotation_on_stand_in_slide(tmp_path, shared_data, synthetic_slide):
    polygons = read_annotations(shared_data / "annotations/camelyon16/Tumor_107.xml")
    assert {p.label for p in polygons} == {AnnotationLabel.TUMOR, AnnotationLabel.EXCLUDE}
    scaled = _fit_polygons(polygons, 1536, margin=64)
    xml = write_asap_xml(tmp_path / "Tumor_107_scaled.xml", scaled)
    # all-tissue external mask: every cell is kept, so the labels show the annotation alone
    Image.fromarray(np.full((96, 96), 255, np.uint8)).save(tmp_path / "all_tissue.png")
    inp = SlideInput(image=str(synthetic_slide), annotation=str(xml), slide_id="tumor_107_standin",
                     tissue_mask=str(tmp_path / "all_tissue.png"))
    meta = prepare_slide(inp, tmp_path / "out", PrepareConfig(patch_size=64, thumbnail_max_size=768))
    grid = read_patch_table(tmp_path / "out" / "tumor_107_standin" / "patches.csv", shape=(24, 24), cell_size=64)
    assert len(grid) == 24 * 24
    labels = grid.label_grid()

    # the same polygons rasterised at full resolution: exact tumor fraction of every 64 px cell
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaled polygons lie inside the slide: nothing is clipped
        full = rasterize_annotations(read_annotations(xml), (1536, 1536), 1.0)
    frac = (full == 2).reshape(24, 64, 24, 64).mean(axis=(1, 3))
    clear = np.abs(frac - 0.2) > 0.03  # cells whose fraction is not at the threshold within rasterisation error
    assert clear.mean() > 0.95
    np.testing.assert_array_equal((labels == PatchLabel.TUMOR)[clear], (frac >= 0.2)[clear])
    np.testing.assert_array_equal(labels[frac == 0], PatchLabel.NORMAL)  # exhaustive: the rest is normal
    n_tumor = int((labels == PatchLabel.TUMOR).sum())
    assert meta["counts"]["tumor"] == n_tumor and 20 < n_tumor < 24 * 24 / 2

    # the largest exclusion polygon (normal tissue inside the tumor outline) carves whole cells out of the tumor
    def cover(rings):
        polys = [AnnotationPolygon(r, label=AnnotationLabel.TUMOR) for r in rings]
        return (rasterize_annotations(polys, (1536, 1536), 1.0) == 2).reshape(24, 64, 24, 64).mean(axis=(1, 3))

    hole = max((p for p in scaled if p.label == AnnotationLabel.EXCLUDE), key=lambda p: p.area)
    tumor_outlines = [p.exterior for p in scaled if p.label == AnnotationLabel.TUMOR]
    carved = (cover([hole.exterior]) == 1) & (cover(tumor_outlines) == 1)
    assert carved.sum() >= 10
    np.testing.assert_array_equal(labels[carved], PatchLabel.NORMAL)


def test_label_mask_png_gives_the_same_labels_as_the_xml(synthetic_dataset, prepared_dataset, tmp_path):
    """A binary tumor mask (255 = tumor) found as ``<stem>_mask.png`` labels the grid like the ASAP XML does."""
    rec = synthetic_dataset.records[0]
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "s0.tif").symlink_to(rec["image"])
    with np.load(rec["truth"]) as truth:
        Image.fromarray(truth["tumor"].astype(np.uint8) * 255).save(folder / "s0_mask.png")
    inputs = collect_inputs(folder)
    assert inputs[0].annotation.endswith("s0_mask.png")
    cfg = PrepareConfig(patch_size=synthetic_dataset.patch_size)
    summary = prepare_dataset(inputs, tmp_path / "out", cfg, progress=False)
    assert not summary["failed"]
    from_mask = read_patch_table(tmp_path / "out" / "s0" / "patches.csv")
    from_xml = read_patch_table(prepared_dataset[0] / rec["id"] / "patches.csv")
    assert np.array_equal(from_mask.rows, from_xml.rows) and np.array_equal(from_mask.cols, from_xml.cols)
    assert (from_mask.labels == 1).sum() > 0
    assert (from_mask.labels == from_xml.labels).mean() > 0.97


def test_pyramidal_label_mask_is_read_at_the_grid_level(synthetic_dataset, prepared_dataset, tmp_path, monkeypatch):
    """A Camelyon16-style mask TIFF (a pyramid of the slide's size, one page per level) is read at the coarsest level
    with ``label_cells_px`` pixels per cell, never at level 0, and labels the grid like the ASAP XML."""
    import tifffile

    from monai_wsi_ext.io import annotations as ann

    rec = synthetic_dataset.records[0]
    with open_slide(rec["image"]) as slide:
        width, height = slide.dimensions
    with np.load(rec["truth"]) as truth:
        tumor, ds = truth["tumor"], float(truth["downsample"])
    rows, cols = np.minimum((np.arange(height) / ds).astype(int), tumor.shape[0] - 1), \
        np.minimum((np.arange(width) / ds).astype(int), tumor.shape[1] - 1)
    level0 = tumor[np.ix_(rows, cols)].astype(np.uint8)  # 1 = tumor, as in ASAP-converted Camelyon16 masks
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "s0.tif").symlink_to(rec["image"])
    with tifffile.TiffWriter(folder / "s0_mask.tif") as tw:
        for k in range(5):
            tw.write(level0[::2 ** k, ::2 ** k], tile=(128, 128), compression="zlib")

    assert ann.label_mask_level_shapes(folder / "s0_mask.tif")[2] == (height // 4, width // 4)
    cfg = PrepareConfig(patch_size=synthetic_dataset.patch_size)  # 16 mask pixels per 64 px cell: downsample 4
    assert ann.label_mask_level_for(folder / "s0_mask.tif", width, cfg.patch_size / cfg.label_cells_px) == 2
    assert ann.label_mask_level_for(folder / "s0_mask.tif", width, 0.5) == 0  # finer than level 0: level 0
    assert ann.label_mask_level_for(folder / "s0_mask.tif", width, 1000) == 4

    levels_read = []
    real_read = ann.read_label_mask

    def spy(path, level=0, **kw):
        levels_read.append(level)
        return real_read(path, level=level, **kw)

    monkeypatch.setattr(ann, "read_label_mask", spy)
    summary = prepare_dataset(collect_inputs(folder), tmp_path / "out", cfg, progress=False)
    assert not summary["failed"] and levels_read == [2]
    from_mask = read_patch_table(tmp_path / "out" / "s0" / "patches.csv")
    from_xml = read_patch_table(prepared_dataset[0] / rec["id"] / "patches.csv")
    assert np.array_equal(from_mask.rows, from_xml.rows) and (from_mask.labels == 1).sum() > 0
    assert (from_mask.labels == from_xml.labels).mean() > 0.97
