"""Tests of the heatmap output writers (monai_wsi_ext.outputs.writers)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from monai_wsi_ext.io import annotations
from monai_wsi_ext.outputs import writers
from monai_wsi_ext.outputs.writers import (
    apply_colormap,
    choose_heatmap_downsample,
    run_record,
    slide_score,
    tumor_regions,
    write_heatmap_tiff,
    write_overlay_png,
    write_prob_itk,
    write_prob_npy,
    write_prob_png,
    write_regions_geojson,
    write_run_record,
    write_slide_outputs,
)

CELL = 256
MPP = 0.25


def _grid() -> np.ndarray:
    """8 x 10 grid: tissue in rows 1-6, cols 1-8 (p = 0.1); blob A (2 x 3 cells) and blob B (1 x 2 cells)."""
    prob = np.full((8, 10), np.nan, dtype=np.float32)
    prob[1:7, 1:9] = 0.1
    prob[2:4, 2:5] = [[0.6, 0.7, 0.8], [0.9, 0.5, 0.6]]  # blob A: 6 cells
    prob[5, 6:8] = [0.95, 0.75]  # blob B: 2 cells
    return prob


def _slide_size(prob: np.ndarray, extra: tuple[int, int] = (100, 37)) -> tuple[int, int]:
    """A slide whose size is not a multiple of the cell: the grid is ceil(size / cell)."""
    return prob.shape[1] * CELL - extra[0], prob.shape[0] * CELL - extra[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -------------------------------------------------------------------------------------------------------------
def test_npy_round_trip(tmp_path):
    prob = _grid()
    path = write_prob_npy(tmp_path / "s_prob.npy", prob.astype(np.float64))
    back = np.load(path)
    assert back.dtype == np.float32 and back.shape == prob.shape
    np.testing.assert_array_equal(np.isnan(back), np.isnan(prob))
    np.testing.assert_array_equal(back[~np.isnan(back)], prob[~np.isnan(prob)])


def test_colormap_values():
    rgb = apply_colormap(np.array([0.0, 0.5, 1.0, np.nan]), "jet")
    np.testing.assert_array_equal(rgb, [[0, 0, 128], [128, 255, 128], [128, 0, 0], [0, 0, 128]])
    np.testing.assert_array_equal(apply_colormap(np.array([0.0, 1.0]), "gray"), [[0, 0, 0], [255, 255, 255]])
    with pytest.raises(ValueError, match="colormap"):
        apply_colormap(np.zeros(2), "nope")


def test_prob_png_transparent_and_white(tmp_path):
    from PIL import Image

    prob = _grid()
    rgba = np.asarray(Image.open(write_prob_png(tmp_path / "a.png", prob)))
    assert rgba.shape == (8, 10, 4)
    np.testing.assert_array_equal(rgba[..., 3], np.where(np.isnan(prob), 0, 255))
    np.testing.assert_array_equal(rgba[5, 6, :3], apply_colormap(np.array(0.95), "jet"))
    rgb = np.asarray(Image.open(write_prob_png(tmp_path / "b.png", prob, background="white", scale=3)))
    assert rgb.shape == (24, 30, 3)
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[3 * 3 + 1, 3 * 2 + 2], apply_colormap(prob[3, 2], "jet"))


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2)), np.full((2, 2), 1.5), np.full((2, 2), -0.2), np.zeros((0, 3))])
def test_rejects_bad_prob(tmp_path, bad):
    with pytest.raises(ValueError, match="prob"):
        write_prob_npy(tmp_path / "x.npy", bad)
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell, expected", [(256, 64), (224, 32), (300, 64), (100, 16), (4, 1), (1, 1)])
def test_choose_downsample(cell, expected):
    assert choose_heatmap_downsample(cell) == expected


def test_heatmap_tiff_layout_and_alignment(tmp_path):
    prob = _grid()
    width, height = _slide_size(prob)
    info = write_heatmap_tiff(tmp_path / "h.tif", prob, CELL, (width, height), mpp=MPP, min_size=4)
    d = info.downsample
    assert d == 64
    with tifffile.TiffFile(info.path) as tif:
        pages = list(tif.pages)
        assert len(pages) == len(info.level_sizes) >= 2
        assert [int(p.subfiletype) for p in pages] == [0] + [1] * (len(pages) - 1)
        assert all(p.is_tiled and p.tilewidth == 256 and p.tilelength == 256 for p in pages)
        assert all(p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and p.dtype == np.uint8 for p in pages)
        desc = json.loads(pages[0].description)
        assert desc["downsample"] == d and desc["slide_size"] == [width, height] and desc["cell_size"] == CELL
        assert pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = pages[0].tags["XResolution"].value
        assert num / den == pytest.approx(1e4 / (MPP * d), rel=1e-6)
        for level, page in enumerate(pages):
            ds = d * 2**level
            h, w = page.shape
            assert (w, h) == info.level_sizes[level] == (math.ceil(width / ds), math.ceil(height / ds))
            assert abs(w * ds - width) < ds and abs(h * ds - height) < ds
        base = pages[0].asarray()
    # a cell's block holds round(255 * p); 256-px cells are 4 x 4 pixel blocks at d = 64
    for (r, c) in [(3, 2), (5, 6), (1, 1)]:
        block = base[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
        assert (block == round(float(prob[r, c]) * 255)).all()
    assert (base[0:4, :] == 0).all()  # no-tissue row
    assert base.shape == (math.ceil(height / d), math.ceil(width / d))


def test_heatmap_tiff_pyramid_levels_sample_the_grid(tmp_path):
    prob = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    prob[::7, ::5] = np.nan
    width, height = 30 * CELL, 40 * CELL
    info = write_heatmap_tiff(tmp_path / "h.tif", prob, CELL, (width, height), tile=16, min_size=8)
    assert info.level_downsamples == [64, 128, 256, 512, 1024, 2048]
    expected8 = np.rint(np.nan_to_num(prob) * 255).astype(np.uint8)
    with tifffile.TiffFile(info.path) as tif:
        for level, page in enumerate(tif.pages):
            img = page.asarray()
            ds = info.level_downsamples[level]
            if ds <= CELL:  # pixel centres fall in cell floor((y + 0.5) * ds / cell)
                rows = ((np.arange(img.shape[0]) + 0.5) * ds // CELL).astype(int)
                cols = ((np.arange(img.shape[1]) + 0.5) * ds // CELL).astype(int)
                np.testing.assert_array_equal(img, expected8[np.ix_(rows, cols)])
    assert info.level_sizes[-1] == (math.ceil(width / 2048), math.ceil(height / 2048))


def test_heatmap_tiff_huge_slide_is_cheap(tmp_path):
    prob = np.zeros((400, 800), np.float32)
    prob[100:110, 200:220] = 1.0
    info = write_heatmap_tiff(tmp_path / "big.tif", prob, CELL, (800 * CELL, 400 * CELL), mpp=MPP)
    assert info.level_sizes[0] == (3200, 1600)  # 204800 x 102400 slide, base = slide / 64
    with tifffile.TiffFile(info.path) as tif:
        base = tif.pages[0].asarray()
    assert base[400:440, 800:880].min() == 255 and base.sum() == 255 * 40 * 80
    assert info.path.stat().st_size < 200_000


def test_heatmap_tiff_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    prob = _grid()
    width, height = _slide_size(prob)
    info = write_heatmap_tiff(tmp_path / "h.tif", prob, CELL, (width, height), mpp=MPP, min_size=4)
    assert openslide.OpenSlide.detect_format(str(info.path)) == "generic-tiff"
    with openslide.OpenSlide(str(info.path)) as slide:
        assert slide.level_count == len(info.level_sizes)
        assert list(slide.level_dimensions) == info.level_sizes
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP * info.downsample)
        assert json.loads(slide.properties["tiff.ImageDescription"])["downsample"] == info.downsample
        region = np.asarray(slide.read_region((0, 0), 0, slide.level_dimensions[0]))
    with tifffile.TiffFile(info.path) as tif:
        np.testing.assert_array_equal(region[..., 0], tif.pages[0].asarray())
    assert (region[..., 3] == 255).all()


def test_heatmap_tiff_cucim(tmp_path):
    cucim = pytest.importorskip("cucim")
    prob = _grid()
    info = write_heatmap_tiff(tmp_path / "h.tif", prob, CELL, _slide_size(prob), mpp=MPP, min_size=4)
    img = cucim.CuImage(str(info.path))
    assert img.resolutions["level_count"] == len(info.level_sizes)
    assert [tuple(s) for s in img.resolutions["level_dimensions"]] == info.level_sizes


def test_heatmap_tiff_non_power_of_two_cell(tmp_path):
    prob = _grid()
    cell = 300
    width, height = prob.shape[1] * cell - 10, prob.shape[0] * cell - 250
    info = write_heatmap_tiff(tmp_path / "h.tif", prob, cell, (width, height))
    d = info.downsample
    assert d == 64
    with tifffile.TiffFile(info.path) as tif:
        base = tif.pages[0].asarray()
        assert "XResolution" not in tif.pages[0].tags or tif.pages[0].tags["ResolutionUnit"].value != 3
    assert abs(base.shape[1] * d - width) < d and abs(base.shape[0] * d - height) < d
    # the pixel whose centre is the centre of cell (2, 3) holds that cell's value
    y, x = int((2.5 * cell) // d), int((3.5 * cell) // d)
    assert base[y, x] == round(float(prob[2, 3]) * 255)


@pytest.mark.parametrize("kwargs", [{"tile": 100}, {"mpp": -1.0}, {"downsample": 3}])
def test_heatmap_tiff_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_heatmap_tiff(tmp_path / "h.tif", _grid(), CELL, (2560, 2048), **kwargs)
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------------------
def test_overlay_png(tmp_path):
    from PIL import Image

    prob = _grid()
    width, height = _slide_size(prob)
    ds = 32.0  # 8 thumbnail pixels per cell
    thumb = np.full((math.ceil(height / ds), math.ceil(width / ds), 3), 200, np.uint8)
    thumb[..., 1] = 150
    path = write_overlay_png(tmp_path / "o.png", thumb, ds, prob, CELL, alpha=0.5, threshold=0.5,
                             outline_color=(0, 255, 0), outline_width=1)
    out = np.asarray(Image.open(path))
    assert out.shape == thumb.shape
    np.testing.assert_array_equal(out[3, 3], thumb[3, 3])  # cell (0, 0): no tissue
    colour = apply_colormap(np.array(0.1), "jet").astype(float)
    expected = np.rint(0.5 * thumb[12, 12].astype(float) + 0.5 * colour)
    np.testing.assert_array_equal(out[12, 12], expected)  # inside cell (1, 1), p = 0.1
    np.testing.assert_array_equal(out[2 * 8, 2 * 8], [0, 255, 0])  # corner of blob A: outline
    inner = np.rint(0.5 * thumb[0, 0].astype(float) + 0.5 * apply_colormap(np.array(0.7), "jet").astype(float))
    np.testing.assert_array_equal(out[2 * 8 + 4, 3 * 8 + 4], inner)  # inside blob A (cell (2, 3)), not outline


def test_overlay_png_equals_the_whole_image_blend(tmp_path):
    """The overlay blends only tissue pixels; every pixel equals the full-image formula (float32 blend where the
    sampled cell has tissue, the thumbnail elsewhere) on a random thumbnail with a non-integer downsample."""
    from PIL import Image

    rng = np.random.default_rng(3)
    thumb = rng.integers(0, 256, (61, 53, 3), dtype=np.uint8)
    prob = rng.random((7, 6))
    prob[rng.random(prob.shape) < 0.4] = np.nan
    ds, alpha = 37.3, 0.4
    out = np.asarray(Image.open(write_overlay_png(tmp_path / "o.png", thumb, ds, prob, CELL, alpha=alpha)))
    r = np.floor((np.arange(61) + 0.5) * ds / CELL).astype(int)
    c = np.floor((np.arange(53) + 0.5) * ds / CELL).astype(int)
    inside = (r[:, None] < 7) & (c[None, :] < 6)
    p = np.where(inside, prob[np.minimum(r, 6)][:, np.minimum(c, 5)], np.nan)
    colour = apply_colormap(p, "jet").astype(np.float32)
    blend = np.rint((1.0 - alpha) * thumb.astype(np.float32) + alpha * colour).astype(np.uint8)
    np.testing.assert_array_equal(out, np.where(np.isfinite(p)[..., None], blend, thumb))


def test_overlay_png_anisotropic_downsample_and_no_outline(tmp_path):
    from PIL import Image

    prob = _grid()
    thumb = np.zeros((16, 20, 4), np.uint8)  # alpha channel is dropped
    out = np.asarray(Image.open(write_overlay_png(tmp_path / "o.png", thumb, (128.0, 128.0), prob, CELL, alpha=1.0)))
    assert out.shape == (16, 20, 3)
    np.testing.assert_array_equal(out[5 * 2, 6 * 2], apply_colormap(np.array(0.95), "jet"))
    with pytest.raises(ValueError, match="thumbnail"):
        write_overlay_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8), 1.0, prob, CELL)


# -------------------------------------------------------------------------------------------------------------
def _region_by_cells(regions, n):
    (reg,) = [r for r in regions if r["n_cells"] == n]
    return reg


def test_tumor_regions_two_blobs():
    prob = _grid()
    regions = tumor_regions(prob, CELL, threshold=0.5, mpp=MPP)
    assert len(regions) == 2
    assert [r["id"] for r in regions] == [1, 2] and [r["n_cells"] for r in regions] == [6, 2]  # largest first
    a, b = _region_by_cells(regions, 6), _region_by_cells(regions, 2)
    assert a["area_px"] == 6 * CELL**2 and b["area_px"] == 2 * CELL**2
    assert a["area_mm2"] == pytest.approx(6 * CELL**2 * MPP**2 / 1e6)
    assert a["mean_probability"] == pytest.approx(np.mean([0.6, 0.7, 0.8, 0.9, 0.5, 0.6]), abs=1e-6)
    assert a["max_probability"] == pytest.approx(0.9, abs=1e-6)
    assert b["mean_probability"] == pytest.approx(0.85, abs=1e-6)
    assert a["bbox"] == [2 * CELL, 2 * CELL, 5 * CELL, 4 * CELL]
    assert b["centroid"] == [7.0 * CELL, 5.5 * CELL]
    for reg in regions:
        poly = reg["polygon"]
        assert poly.label == annotations.AnnotationLabel.TUMOR and poly.holes == []
        x0, y0, x1, y1 = reg["bbox"]
        ext = poly.exterior
        assert ext[:, 0].min() == x0 and ext[:, 0].max() == x1 and ext[:, 1].min() == y0 and ext[:, 1].max() == y1
        # a rectangle of cells: its area less four corner triangles with legs cell / 4
        assert writers._signed_area(ext) == pytest.approx(reg["area_px"] - CELL**2 / 8)
    # min_cells drops the small one; threshold above everything gives none
    assert [r["n_cells"] for r in tumor_regions(prob, CELL, 0.5, min_cells=3)] == [6]
    assert tumor_regions(prob, CELL, threshold=0.99) == []
    assert tumor_regions(prob, CELL)[0]["area_mm2"] is None


def test_tumor_regions_diagonal_and_hole():
    prob = np.zeros((9, 9), np.float32)
    prob[1, 1] = prob[2, 2] = 0.8  # touching at a corner: one region under 8-connectivity
    prob[4:9, 4:9] = 0.9
    prob[6, 6] = 0.2  # hole in a 5 x 5 ring
    prob[8, 8] = np.nan
    regions = tumor_regions(prob, 10.0)
    assert [r["n_cells"] for r in regions] == [23, 2]
    ring, diag = regions
    assert len(ring["polygon"].holes) == 1 and diag["polygon"].holes == []
    hole = ring["polygon"].holes[0]
    assert writers._signed_area(hole) < 0 < writers._signed_area(ring["polygon"].exterior)
    assert hole[:, 0].min() == 60 and hole[:, 0].max() == 70  # the hole follows cell (6, 6)'s borders
    for reg in regions:
        ext = reg["polygon"].exterior
        assert len(np.unique(ext, axis=0)) == len(ext)  # simple ring: no repeated vertex even at the diagonal


def test_regions_geojson_valid_and_qupath_fields(tmp_path):
    prob = _grid()
    width, height = _slide_size(prob)
    regions = tumor_regions(prob, CELL, mpp=MPP)
    path = write_regions_geojson(tmp_path / "t.geojson", regions)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for feat, reg in zip(doc["features"], regions):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        for ring in feat["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            pts = np.asarray(ring)
            assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= width
            assert pts[:, 1].min() >= 0 and pts[:, 1].max() <= height
        props = feat["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tumor"
        assert props["name"] == reg["name"]
        assert props["measurements"]["n_cells"] == reg["n_cells"] == props["n_cells"]
        assert props["measurements"]["area_mm2"] == pytest.approx(reg["area_mm2"])
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())
    if hasattr(annotations, "read_annotations"):
        polys = annotations.read_annotations(path)
        assert len(polys) == len(regions)
        assert all(p.label == annotations.AnnotationLabel.TUMOR for p in polys)


@pytest.mark.skipif(not (hasattr(annotations, "read_annotations") and hasattr(annotations, "rasterize_annotations")),
                    reason="annotation reader/rasteriser not available")
def test_regions_geojson_round_trip_recovers_the_cells(tmp_path):
    prob = np.zeros((9, 9), np.float32)
    prob[1, 1] = prob[2, 2] = 0.8
    prob[4:9, 4:9] = 0.9
    prob[6, 6] = 0.2
    prob[8, 8] = np.nan
    path = write_regions_geojson(tmp_path / "t.geojson", tumor_regions(prob, CELL))
    polys = annotations.read_annotations(path)
    assert len(polys) == 2 and sum(len(p.holes) for p in polys) == 1
    mask = annotations.rasterize_annotations(polys, prob.shape, float(CELL))
    np.testing.assert_array_equal(mask == 2, np.nan_to_num(prob) >= 0.5)


def test_regions_geojson_without_mpp_omits_area_mm2(tmp_path):
    path = write_regions_geojson(tmp_path / "t.geojson", tumor_regions(_grid(), CELL))
    props = json.loads(path.read_text())["features"][0]["properties"]
    assert "area_mm2" not in props["measurements"] and props["measurements"]["area_px"] == 6 * CELL**2


# -------------------------------------------------------------------------------------------------------------
def test_slide_score_methods():
    prob = np.full((5, 5), 0.0, np.float32)
    prob[2, 2] = 0.9
    prob[0, :] = np.nan
    assert slide_score(prob, "max") == pytest.approx(0.9)
    assert slide_score(prob, "top_k_mean", k=2) == pytest.approx(0.45)
    # the spike is diluted by its 8 tissue neighbours (0.1); a cell next to the no-tissue row has 6 (0.15)
    assert slide_score(prob) == pytest.approx(0.9 / 6)
    assert np.nanmax(writers._smoothed(prob)[2:]) == pytest.approx(0.1)
    edge = np.full((3, 3), np.nan, np.float32)
    edge[0, 0], edge[0, 1] = 0.8, 0.4  # NaN neighbours do not count
    assert slide_score(edge) == pytest.approx(0.6)
    assert slide_score(np.full((2, 2), np.nan)) is None  # no tissue: no score (status no_tissue), not 0.0
    with pytest.raises(ValueError, match="method"):
        slide_score(prob, "mean")


# -------------------------------------------------------------------------------------------------------------
def test_tiff_write_failure_leaves_nothing(tmp_path, monkeypatch):
    prob = _grid()
    target = tmp_path / "h.tif"
    real = writers._paint_tile
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "_paint_tile", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_heatmap_tiff(target, prob, CELL, _slide_size(prob), tile=16, min_size=4)
    assert calls["n"] == 2 and _leftovers(tmp_path) == []
    # an earlier good file survives a failed rewrite untouched
    monkeypatch.setattr(writers, "_paint_tile", real)
    write_heatmap_tiff(target, prob, CELL, _slide_size(prob), tile=16, min_size=4)
    before = target.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(writers, "_paint_tile", failing)
    with pytest.raises(RuntimeError):
        write_heatmap_tiff(target, prob * 0.5, CELL, _slide_size(prob), tile=16, min_size=4)
    assert target.read_bytes() == before and _leftovers(tmp_path) == ["h.tif"]


def test_png_write_failure_leaves_nothing(tmp_path, monkeypatch):
    from PIL import Image

    def half_write(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):  # the writers pass an open temporary file (io.atomic.atomic_open)
            fp.write(b"\x89PNG partial")
        else:
            Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError("no space left")

    monkeypatch.setattr(Image.Image, "save", half_write)
    with pytest.raises(OSError, match="no space"):
        write_prob_png(tmp_path / "p.png", _grid())
    with pytest.raises(OSError, match="no space"):
        write_overlay_png(tmp_path / "o.png", np.zeros((10, 10, 3), np.uint8), 256.0, _grid(), CELL)
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------------------
def test_run_record(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"tiny weights \x00\x01")
    rec = run_record(note="x")
    for key in ("timestamp_utc", "python", "platform", "packages", "git_commit", "command"):
        assert key in rec
    assert rec["note"] == "x" and rec["packages"]["numpy"] == np.__version__
    assert rec["timestamp_utc"].endswith("+00:00")
    assert rec["git_commit"] is None or len(rec["git_commit"]) == 40
    config = {"b": [1, 2], "a": {"y": 0.5, "x": "z"}}
    written = write_run_record(tmp_path / "r.json", config, {"unet": weights, "gone": tmp_path / "missing.pt"},
                               command=["predict", "--x", 1])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == written
    assert on_disk["weights"]["unet"]["sha256"] == hashlib.sha256(b"tiny weights \x00\x01").hexdigest()
    assert on_disk["weights"]["unet"]["size_bytes"] == 15
    assert on_disk["weights"]["gone"]["sha256"] is None
    assert on_disk["command"] == ["predict", "--x", "1"]
    assert on_disk["config"] == config
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    assert on_disk["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    reordered = write_run_record(tmp_path / "r2.json", {"a": {"x": "z", "y": 0.5}, "b": [1, 2]})
    assert reordered["config_sha256"] == on_disk["config_sha256"]


# -------------------------------------------------------------------------------------------------------------
def test_write_slide_outputs(tmp_path):
    from PIL import Image

    prob = _grid()
    width, height = _slide_size(prob)
    thumb = np.full((math.ceil(height / 64), math.ceil(width / 64), 3), 230, np.uint8)
    weights = tmp_path / "unet.pt"
    weights.write_bytes(b"abc")
    res = write_slide_outputs(tmp_path / "out", 7, prob, CELL, (width, height), MPP, thumb, 64.0,
                              config={"k": 1}, weights={"unet": weights})
    names = {k: v.name for k, v in res.items() if isinstance(v, Path)}
    assert names == {"prob_npy": "7_prob.npy", "prob_png": "7_prob.png", "heatmap_tiff": "7_heatmap.tif",
                     "overlay_png": "7_overlay.png", "tumor_geojson": "7_tumor.geojson",
                     "record_json": "7_record.json"}
    assert _leftovers(tmp_path / "out") == sorted(names.values())
    assert res["n_regions"] == 2 and res["heatmap_downsample"] == 64
    assert res["slide_score"] == pytest.approx(slide_score(prob))
    record = json.loads(res["record_json"].read_text())
    assert record["slide_id"] == "7" and record["n_regions"] == 2
    assert record["slide_score"] == pytest.approx(res["slide_score"])
    assert record["outputs"]["heatmap_tiff"] == "7_heatmap.tif" and record["heatmap_downsample"] == 64
    assert record["weights"]["unet"]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert [r["n_cells"] for r in record["regions"]] == [6, 2]
    assert np.asarray(Image.open(res["overlay_png"])).shape == thumb.shape
    assert res["prob_itk"] is None and record["outputs"]["prob_itk"] is None  # not asked for
    no_thumb = write_slide_outputs(tmp_path / "out2", "s", prob, CELL, (width, height), None, None, None)
    assert no_thumb["overlay_png"] is None and not (tmp_path / "out2" / "s_overlay.png").exists()
    with_itk = write_slide_outputs(tmp_path / "out3", "s", prob, CELL, (width, height), MPP, None, None,
                                   itk_format="nrrd")
    assert with_itk["prob_itk"].name == "s_prob.nrrd" and with_itk["prob_itk"].is_file()
    assert json.loads(with_itk["record_json"].read_text())["outputs"]["prob_itk"] == "s_prob.nrrd"
    with pytest.raises(ValueError, match="itk_format"):
        write_slide_outputs(tmp_path / "out4", "s", prob, CELL, (width, height), MPP, None, None, itk_format="png")
    with pytest.raises(ValueError, match="slide_id"):
        write_slide_outputs(tmp_path, "../evil", prob, CELL, (width, height), None, None, None)


# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_itk_heatmap_physical_geometry(tmp_path, fmt):
    """The ITK image holds the grid (NaN kept) with spacing = cell size in mm and each pixel at its cell's centre."""
    itk = pytest.importorskip("itk")
    prob = _grid()
    path = write_prob_itk(tmp_path / f"s1.v2_prob.{fmt}", prob, CELL, mpp=MPP)  # a dot in the slide id
    assert _leftovers(tmp_path) == [f"s1.v2_prob.{fmt}"]
    image = itk.imread(str(path))
    back = itk.array_from_image(image)
    assert back.dtype == np.float32 and back.shape == prob.shape
    np.testing.assert_array_equal(np.isnan(back), np.isnan(prob))
    np.testing.assert_allclose(back[~np.isnan(prob)], prob[~np.isnan(prob)])
    mm = CELL * MPP / 1000.0  # 0.064 mm per cell
    np.testing.assert_allclose(np.asarray(itk.spacing(image)), [mm, mm], rtol=1e-6)
    # ITK indexes (x, y) = (col, row): cell (row 5, col 6) (blob B, p = 0.95) sits at its centre on the slide
    point = image.TransformIndexToPhysicalPoint([6, 5])
    np.testing.assert_allclose([point[0], point[1]], [6.5 * mm, 5.5 * mm], rtol=1e-6)
    assert back[5, 6] == pytest.approx(0.95)


def test_itk_heatmap_without_mpp_and_bad_names(tmp_path):
    itk = pytest.importorskip("itk")
    image = itk.imread(str(write_prob_itk(tmp_path / "a_prob.mha", _grid(), CELL)))
    np.testing.assert_allclose(np.asarray(itk.spacing(image)), [CELL, CELL])  # level-0 pixels without an mpp
    np.testing.assert_allclose(np.asarray(itk.origin(image)), [CELL / 2, CELL / 2])
    with pytest.raises(ValueError, match="must end in"):
        write_prob_itk(tmp_path / "a_prob.png", _grid(), CELL)
    assert _leftovers(tmp_path) == ["a_prob.mha"]
