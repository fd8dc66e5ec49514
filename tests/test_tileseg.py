"""Tests of pixel-level tile segmentation (``monai_wsi_ext.tileseg``, ``train_tile_seg.json``, ``infer_tile_seg.json``):
masks at a target µm/px for slides of any size and mpp, tiles padded at the border, tissue-only tiles, the
identity round trip of the restitching, post-processing, and a tiny training run whose held-out slide is scored by
``evaluate.json``.

The machine these run on is shared (2 cores, often more than 2 busy processes): torch runs single-threaded here,
which is several times faster than 2 contending threads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.io.annotations import (
    MASK_TUMOR,
    AnnotationLabel,
    AnnotationPolygon,
    rasterize_annotations,
    read_annotations,
    write_asap_xml,
    write_qupath_geojson,
)
from monai_wsi_ext.labels import IGNORE_INDEX
from monai_wsi_ext.tileseg.masks import SlideLabels, sample_mask, target_geometry, tile_fractions, tile_targets

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
TILE = 128  # tile side of the tiny runs (target pixels)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four generated 1024 x 1024 slides at 0.5 µm/px (two training, one validation, one held-out test slide),
    prepared with 64 px patches: at 1 µm/px each is 512 x 512 px, 16 tiles of 128 px."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("tileseg")
    manifest = generate_dataset(root / "data", n_train=2, n_val=1, n_test=1, seed=3, width=1024, height=1024,
                                patch_size=64, n_lumps=2, truth_downsample=4)
    summary = prepare_dataset(collect_inputs(manifest=manifest), root / "prepared",
                              PrepareConfig(patch_size=64, thumbnail_max_size=512), progress=False)
    assert not summary["failed"]
    overrides = {"dataset_dir": str(root / "prepared"), "output_dir": str(root / "out"),
                 "ckpt_dir": str(root / "models"), "num_workers": 0, "tile_size": TILE}
    return {"root": root, "manifest": Path(manifest), "prepared": root / "prepared", "overrides": overrides}


# ----------------------------------------------------------------------------------------------------------------
# masks at a target resolution


@pytest.mark.parametrize("size, mpp, target, shape", [
    ((1536, 1024), 0.25, 1.0, (256, 384)),
    ((1536, 1024), 0.5, 1.0, (512, 768)),
    ((15640, 15640), 0.243, 2.0, (1901, 1901)),
    ((17920, 12000), 0.243, 2.0, (1458, 2178)),
    ((1000, 700), 0.5, 0.9, (389, 556)),
])
def test_target_geometry_keeps_the_aspect_ratio(size, mpp, target, shape):
    geo = target_geometry(size, mpp, target)
    assert geo.shape == shape
    assert geo.downsample == pytest.approx(target / mpp)
    # one factor for both axes: the aspect ratio is the slide's up to the last, partial pixel
    assert geo.aspect_error <= 1.0 / min(shape) + 1e-12
    assert abs(geo.shape[1] * geo.downsample - size[0]) < geo.downsample
    assert abs(geo.shape[0] * geo.downsample - size[1]) < geo.downsample


def test_target_geometry_needs_an_mpp():
    from monai_wsi_ext.errors import ConfigError

    with pytest.raises(ConfigError, match="no mpp"):
        target_geometry((100, 100), None, 1.0, "slide.tif")
    with pytest.raises(ConfigError, match="target_mpp"):
        target_geometry((100, 100), 0.5, -1.0)


def _ring(cx: float, cy: float, r: float, n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _annotation_files(folder: Path, size: tuple[int, int], mpp: float) -> tuple[dict[str, Path], tuple]:
    """One tumor disc of 80 µm radius with a 30 µm hole, in every format the project reads."""
    folder.mkdir(parents=True, exist_ok=True)
    cx, cy = 0.6 * size[0], 0.4 * size[1]
    outer, hole = _ring(cx, cy, 80 / mpp), _ring(cx, cy, 30 / mpp)
    poly = AnnotationPolygon(outer, [hole], AnnotationLabel.TUMOR, "tumor", "_0")
    files = {"asap": write_asap_xml(folder / "a.xml", [poly]), "geojson": write_qupath_geojson(folder / "a.geojson",
                                                                                                  [poly])}
    ncrf = {"positive": [{"name": "t", "vertices": outer.tolist()}], "negative": [{"name": "h",
                                                                                   "vertices": hole.tolist()}]}
    files["ncrf_json"] = folder / "a.json"
    files["ncrf_json"].write_text(json.dumps(ncrf))

    def vertices(ring):
        return "".join(f'<Vertex X="{x:.3f}" Y="{y:.3f}"/>' for x, y in ring)

    files["imagescope"] = folder / "b.xml"
    files["imagescope"].write_text(
        f'<Annotations><Annotation Id="1" Name="Tumor"><Regions><Region Id="1"><Vertices>{vertices(outer)}'
        f'</Vertices></Region><Region Id="2" NegativeROA="1"><Vertices>{vertices(hole)}</Vertices></Region>'
        "</Regions></Annotation></Annotations>")
    # label-mask images at downsample 4, tumor 255
    label = rasterize_annotations([poly], (size[1] // 4, size[0] // 4), 4.0)
    image = np.where(label == MASK_TUMOR, 255, 0).astype(np.uint8)
    from PIL import Image
    import tifffile

    files["mask_png"] = folder / "a_mask.png"
    Image.fromarray(image).save(files["mask_png"])
    files["mask_tif"] = folder / "a_mask.tif"
    tifffile.imwrite(files["mask_tif"], image)
    return files, (cx, cy)


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_masks_from_every_annotation_format_at_a_target_mpp(tmp_path, mpp):
    """The same physical annotation on a 1536 x 1024 slide scanned at 0.25 or 0.5 µm/px gives, at 1 µm/px, a mask
    of the slide's aspect ratio whose tumor has the right area, position and round (unstretched) shape."""
    size = (1536, 1024)
    geo = target_geometry(size, mpp, 1.0)
    files, (cx, cy) = _annotation_files(tmp_path / str(mpp), size, mpp)
    area = math.pi * (80 ** 2 - 30 ** 2)  # µm² = target px²
    for fmt, path in files.items():
        labels = SlideLabels.from_file(path, size, geo.downsample)
        assert labels.kind == ("image" if fmt.startswith("mask") else "polygons"), fmt
        mask = labels.mask(geo.shape, geo.downsample)
        assert mask.shape == geo.shape and mask.shape[1] / mask.shape[0] == pytest.approx(1.5), fmt
        tumor = mask == MASK_TUMOR
        coarse = fmt.startswith("mask") and mpp == 0.5  # a 2 µm/px label image sampled at 1 µm/px
        assert tumor.sum() == pytest.approx(area, rel=0.06 if coarse else 0.02), fmt
        rr, cc = np.nonzero(tumor)
        height, width = rr.max() - rr.min() + 1, cc.max() - cc.min() + 1
        assert width == pytest.approx(160, abs=3) and height == pytest.approx(160, abs=3), (fmt, width, height)
        assert cc.mean() == pytest.approx(cx / geo.downsample, abs=1.5), fmt
        assert rr.mean() == pytest.approx(cy / geo.downsample, abs=1.5), fmt
        assert not tumor[int(round(cy / geo.downsample)), int(round(cx / geo.downsample))], f"{fmt}: hole lost"
        # a window is the same pixels as the whole-slide mask (tiles need no whole-slide mask)
        win = labels.window((300, 100), (64, 96), geo.downsample)
        full = np.zeros((geo.shape[0] + 200, geo.shape[1] + 200), np.uint8)
        full[:geo.shape[0], :geo.shape[1]] = mask
        assert (win != full[100:164, 300:396]).mean() < 0.002, fmt


def test_tile_targets_ignore_padding_and_unknown_tissue():
    label = np.array([[0, 1, 2], [0, 0, 2]], np.uint8)
    tissue = np.array([[True, True, True], [False, True, True]])
    valid = np.array([[True, True, True], [True, True, False]])
    assert tile_targets(label, tissue, True, valid).tolist() == [[0, 0, 1], [0, 0, IGNORE_INDEX]]
    # not exhaustive: unannotated tissue is unknown, unannotated glass is not tumor
    assert tile_targets(label, tissue, False).tolist() == [[IGNORE_INDEX, 0, 1], [0, IGNORE_INDEX, 1]]


def test_sample_mask_and_tile_fractions_treat_outside_as_empty():
    mask = np.ones((4, 4), bool)
    out = sample_mask(mask, 8.0, (6, 6), 8.0, origin=(-1, 1), fill=False)
    assert out[:, 0].sum() == 0 and out[:3, 1:5].all() and not out[3:].any()
    frac = tile_fractions(mask, 8.0, np.array([0.0, 16.0, 100.0]), np.array([0.0, 16.0, 0.0]), 32.0, samples=4)
    assert frac.tolist() == [1.0, 0.25, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# tiles, restitching, tissue-only tiles


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    """A 1000 x 700 slide at 0.5 µm/px: at 1 µm/px 500 x 350 px, not a whole number of tiles either way."""
    from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide

    path = tmp_path_factory.mktemp("small") / "small.tif"
    generate_slide(path, 11, SyntheticSlideConfig(width=1000, height=700, mpp=0.5, patch_size=64, n_lumps=2,
                                                  tumor_points=0, truth_downsample=4))
    return path


def test_tiles_are_read_at_the_target_mpp_and_padded_at_the_border(small_slide):
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.tileseg.tiles import PAD_VALUE, SlideAtMpp

    with open_slide(small_slide) as slide:
        view = SlideAtMpp(slide, 1.0)
        assert view.shape == (350, 500) and view.level == 1 and view.factor == pytest.approx(1.0)
        whole = view.read(0, 0, 500, 350)
        assert np.array_equal(whole, slide.read_region(0, 0, 500, 350, 1))  # pyramid level 1 is 1 µm/px
        # 1.5 µm/px is no pyramid level: level 1 area-averaged by 1.5 (3x3 level pixels -> 2x2 target pixels)
        coarse = SlideAtMpp(slide, 1.5)
        assert coarse.level == 1 and coarse.factor == pytest.approx(1.5) and coarse.shape == (234, 334)
        third = whole[:348, :498].astype(np.float32).reshape(116, 3, 166, 3, 3)
        img = coarse.read(0, 0, 332, 232).astype(np.float32).reshape(116, 2, 166, 2, 3)
        # each 2x2 target block averages its 3x3 level block
        assert np.abs(img.mean(axis=(1, 3)) - third.mean(axis=(1, 3))).max() <= 1.0
        corner = view.read(448, 300, TILE, TILE)
        assert corner.shape == (TILE, TILE, 3)
        assert np.array_equal(corner[:50, :52], whole[300:, 448:])
        assert (corner[50:] == PAD_VALUE).all() and (corner[:, 52:] == PAD_VALUE).all()
        before = view.read(-20, -10, 64, 64)
        assert (before[:10] == PAD_VALUE).all() and np.array_equal(before[10:, 20:], whole[:54, :44])
        # batched reads (inside the slide) and single reads (at the border) give the same pixels
        locs = np.array([[0, 0], [96, 192], [300, 448], [222, 384]])
        for (y, x), tile in zip(locs, view.read_tiles(locs, TILE, batch_size=3)):
            assert np.array_equal(tile, view.read(int(x), int(y), TILE, TILE)), (y, x)
        fine = SlideAtMpp(slide, 0.75)  # finer than level 1: read from level 0
        assert fine.level == 0 and fine.factor == pytest.approx(1.5) and fine.shape == (467, 667)


@pytest.mark.parametrize("target, blend, overlap", [(1.0, "gaussian", 0.25), (1.0, "constant", 32),
                                                    (0.9, "gaussian", 0.5)])
def test_restitching_is_exact_for_an_identity_model(small_slide, target, blend, overlap):
    """A model that returns its input, over overlapping tiles blended with any weights, gives back the slide image
    at the target resolution exactly, borders included (the last tiles reach past the slide and are cropped)."""
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.tileseg.infer import TileSegInferer
    from monai_wsi_ext.tileseg.tiles import SlideAtMpp

    with open_slide(small_slide) as slide:
        view = SlideAtMpp(slide, target)
        rows, cols = view.shape
        inferer = TileSegInferer(target, TILE, overlap, blend=blend, batch_size=4, read_batch=5)
        merged, splitter = inferer.predict(view, torch.nn.Identity(), tissue=None, output=None)
        reference = view.read(0, 0, cols, rows).astype(np.float32).transpose(2, 0, 1) / 255.0
    assert merged.shape == (3, rows, cols) and not np.isnan(merged).any()
    assert splitter.n_tiles == splitter.n_positions > math.ceil(rows / TILE) * math.ceil(cols / TILE)
    np.testing.assert_allclose(merged, reference, rtol=0, atol=1e-6)


def test_only_tissue_tiles_are_inferred(tiny):
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.prepare import load_prepared
    from monai_wsi_ext.tileseg.infer import SlideTileSplitter, TileSegInferer
    from monai_wsi_ext.tileseg.tiles import SlideAtMpp, prepared_tissue

    prepared = load_prepared(tiny["prepared"] / "test_000")
    tissue = prepared_tissue(prepared)
    with open_slide(prepared.image) as slide:
        view = SlideAtMpp(slide, 1.0)
        every = SlideTileSplitter(TILE, 0.25).locations(view)
        kept = SlideTileSplitter(TILE, 0.25, tissue=tissue).locations(view)
        frac = tile_fractions(tissue.mask, tissue.downsample, every[:, 1] * 2.0, every[:, 0] * 2.0, TILE * 2.0, 16)
        assert 0 < len(kept) < len(every)
        assert {tuple(v) for v in kept} == {tuple(v) for v, f in zip(every, frac) if f > 0}
        merged, splitter = TileSegInferer(1.0, TILE, 0.25).predict(view, torch.nn.Identity(), tissue, output=None)
        reference = view.read(0, 0, view.shape[1], view.shape[0]).astype(np.float32).transpose(2, 0, 1) / 255.0
    covered = np.zeros(view.shape, bool)
    for y, x in kept:
        covered[y:y + TILE, x:x + TILE] = True
    assert splitter.n_tiles == len(kept)
    assert np.array_equal(~np.isnan(merged[0]), covered)
    np.testing.assert_allclose(merged[:, covered], reference[:, covered], atol=1e-6)


def test_training_tiles_are_tissue_tiles_and_sampled_balanced(tiny):
    from monai_wsi_ext.tileseg.tiles import TileSegDataset, tile_sampler

    ds = TileSegDataset(str(tiny["prepared"]), "training", target_mpp=1.0, tile_size=TILE, min_tissue=0.25,
                        seed=0)
    assert len(ds) < 2 * 16  # the background tiles are left out
    for s, y, x in ds.tiles:
        tissue = ds.slides[s]["tissue"]
        assert tile_fractions(tissue.mask, tissue.downsample, [x * 2.0], [y * 2.0], TILE * 2.0, 16)[0] >= 0.25
    labels = ds.labels
    assert 0 < labels.sum() < len(labels)
    drawn = np.array(list(tile_sampler(ds, 4000, seed=1)))
    assert labels[drawn].mean() == pytest.approx(0.5, abs=0.04)
    item = ds[int(np.argmax(labels))]
    assert item["image"].shape == (3, TILE, TILE) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, TILE, TILE) and item["label"].dtype == torch.int64
    assert set(torch.unique(item["label"]).tolist()) <= {IGNORE_INDEX, 0, 1}
    # the same seed gives the same jittered, augmented tile; the plain tile has exactly its mask's tumor
    first, again = (TileSegDataset(str(tiny["prepared"]), "training", target_mpp=1.0, tile_size=TILE, seed=0)[3]
                    for _ in range(2))
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    plain = TileSegDataset(str(tiny["prepared"]), "training", target_mpp=1.0, tile_size=TILE, train=False)
    index = int(np.argmax(plain.labels))
    image, target = plain.read_tile(index)
    assert (target == 1).mean() == pytest.approx(float(plain.tumor[index]), abs=0.05)


def test_masked_dice_ce_loss_ignores_pixels():
    from monai_wsi_ext.tileseg.tiles import MaskedDiceCELoss

    loss = MaskedDiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).long()
    target[:, :, :4] = IGNORE_INDEX
    other = logits.detach().clone()
    other[:, :, :4] = torch.randn(2, 2, 4, 8) * 5
    assert loss(logits, target).item() == pytest.approx(loss(other, target).item(), rel=1e-6)
    value = loss(logits, torch.full_like(target, IGNORE_INDEX))
    value.backward()
    assert value.item() == 0.0 and logits.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# post-processing and grid probabilities


def test_postprocess_masks_tissue_removes_small_objects_and_fills_holes():
    from monai_wsi_ext.tileseg.postprocess import TileSegPostprocess

    prob = np.zeros((40, 40), np.float32)
    prob[5:25, 5:25] = 0.9
    prob[12:15, 12:15] = 0.2  # a 9 px hole
    prob[30:32, 30:32] = 0.8  # a 4 px speck
    prob[0, 39] = np.nan  # not inferred
    tissue = np.ones((40, 40), bool)
    tissue[:, 35:] = False
    prob[10:12, 36:39] = 0.95  # tumor-looking glass
    result = TileSegPostprocess(0.5, True, min_object_um2=20.0, max_hole_um2=16.0)(prob, tissue, pixel_um=1.0)
    expected = np.zeros((40, 40), bool)
    expected[5:25, 5:25] = True
    assert np.array_equal(result.mask, expected)
    assert result.removed_objects == 1 and result.filled_holes == 1
    assert np.isnan(result.prob[:, 35:]).all() and not np.isnan(result.prob[:, :35]).any()
    on = ~np.isnan(result.prob)
    assert np.array_equal(result.prob[on] > 0.5, result.mask[on])
    assert np.array_equal(result.prob[on] >= 0.5, result.mask[on])
    keep_all = TileSegPostprocess(0.5, False)(prob, tissue, pixel_um=1.0)
    assert keep_all.mask[31, 31] and keep_all.mask[11, 37] and not keep_all.mask[13, 13]


def test_grid_probabilities_are_the_cell_means(tiny):
    from monai_wsi_ext.prep.prepare import load_prepared
    from monai_wsi_ext.tileseg.outputs import grid_probabilities

    grid = load_prepared(tiny["prepared"] / "test_000").grid  # 64 px cells
    for ds in (2.0, 1.5):  # 32 px per cell exactly; 42.7 px per cell (sampled)
        rows, cols = math.ceil(1024 / ds), math.ceil(1024 / ds)
        ramp = np.broadcast_to(((np.arange(cols) + 0.5) * ds / 1024.0).astype(np.float32), (rows, cols))
        out = grid_probabilities(ramp, ds, grid)
        kept = ~np.isnan(out)
        assert np.array_equal(kept, grid.label_grid() > -2)
        centres = (np.arange(grid.shape[1]) + 0.5) * 64 / 1024.0
        np.testing.assert_allclose(out[kept], np.broadcast_to(centres, out.shape)[kept], atol=0.01)


def test_outputs_are_aligned_and_scored_like_the_canvas_method(tmp_path):
    """The writers' files from a pixel mask: QuPath polygons with holes in level-0 coordinates, a TIFF aligned with
    the slide, grid probabilities and labels where ``load_heatmap_dir`` reads them, the pixel Dice in the record."""
    import tifffile

    from monai_wsi_ext.evaluation.report import load_heatmap_dir
    from monai_wsi_ext.prep.grid import PatchGrid
    from monai_wsi_ext.tileseg.outputs import write_tile_seg_outputs
    from monai_wsi_ext.tileseg.postprocess import TileSegPostprocess

    ds, shape = 4.0, (96, 128)  # a 512 x 384 slide at 0.25 µm/px seen at 1 µm/px
    prob = np.full(shape, 0.1, np.float32)
    prob[20:60, 30:90] = 0.9
    prob[35:45, 50:70] = 0.1  # a 200 px hole: kept (max_hole_um2 below it)
    result = TileSegPostprocess(0.5, min_object_um2=10.0, max_hole_um2=50.0)(prob, None, pixel_um=1.0)
    rr, cc = np.mgrid[0:3, 0:4]
    grid = PatchGrid("s", 0, 128, 128.0, (3, 4), rr.ravel(), cc.ravel(), np.ones(12, np.float32),
                     labels=np.array([0, 1, 1, 0] * 3))
    truth = np.zeros(shape, bool)
    truth[20:60, 30:90] = True
    written = write_tile_seg_outputs(tmp_path / "s", "s", result, ds, 1.0, (512, 384), 0.25, grid,
                                     np.full((96, 128, 3), 200, np.uint8), 4.0, truth=truth, truth_source="t")
    polygons = read_annotations(written["tumor_geojson"])
    assert len(polygons) == 1 and len(polygons[0].holes) == 1
    assert polygons[0].exterior[:, 0].min() == pytest.approx(30 * ds) and polygons[0].exterior.max() <= 90 * ds
    assert polygons[0].area == pytest.approx((40 * 60 - 10 * 20) * ds * ds, rel=0.01)
    with tifffile.TiffFile(written["heatmap_tiff"]) as tif:
        assert tif.pages[0].shape == shape and json.loads(tif.pages[0].description)["downsample"] == 4
    record = json.loads(written["record_json"].read_text())
    assert record["pixel_dice"] == pytest.approx(2 * 2200 / (2200 + 2400))
    (slide,) = load_heatmap_dir(tmp_path)
    assert slide.cell_size == 128.0 and slide.mpp == 0.25 and slide.prob.shape == (3, 4)
    assert np.array_equal(slide.labels, grid.label_grid())
    cell = result.prob[0:32, 32:64]  # cell (0, 1): 128 level-0 px = 32 target px per side
    assert slide.prob[0, 1] == pytest.approx(float(cell.mean()), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# the bundle configs end to end


def test_train_and_infer_configs_agree_on_the_network():
    train = json.loads((CONFIGS / "train_tile_seg.json").read_text())
    infer = json.loads((CONFIGS / "infer_tile_seg.json").read_text())
    for key in ("network_def", "tile_mpp", "tile_size", "tile_channels", "tile_strides"):
        assert train[key] == infer[key], key


def _workflow(config: str, workflow_type: str | None, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON, str(CONFIGS / config)], workflow_type=workflow_type,
                        logging_file=str(CONFIGS / "logging.conf"), **overrides)
    wf.initialize()
    return wf


def test_tiny_training_run_segments_a_held_out_slide(tiny):
    """Three epochs of 6 batches of 8 tiles (128 px at 1 µm/px) on two generated slides, one more after resuming;
    inference on the held-out slide through ``python -m monai.bundle run``; ``evaluate.json`` scores the folder.
    Measured (seed 3, one thread): validation Dice 0.54, 0.53, 0.65, 0.68; on the test slide pixel Dice 0.79 (an
    all-tissue-is-tumor mask: 0.50), patch accuracy 0.74 (majority class 0.53), patch ROC-AUC 0.86."""
    o = tiny["overrides"]
    wf = _workflow("train_tile_seg.json", "train", max_epochs=3, batch_size=8, samples_per_epoch=48,
                   learning_rate=3e-3, **o)
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    models = Path(o["ckpt_dir"])
    assert sorted(p.name for p in models.iterdir()) == ["tile_seg.pt", "tile_seg_resume.pt"]
    best = wf.parser.get_parsed_content("validate#evaluator").state.best_metric
    assert best > 0.4, best

    # resumable: one more epoch continues from the checkpoint of epoch 3
    wf = _workflow("train_tile_seg.json", "train", max_epochs=4, batch_size=8, samples_per_epoch=48,
                   learning_rate=3e-3, resume="auto", **o)
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 4 and trainer.state.iteration == 4 * 6
    wf.finalize()
    # ... and repeats an uninterrupted run of 4 epochs exactly (random states of the tiles and the sampler kept)
    fresh = {**o, "ckpt_dir": str(tiny["root"] / "models_fresh"), "output_dir": str(tiny["root"] / "out_fresh")}
    wf = _workflow("train_tile_seg.json", "train", max_epochs=4, batch_size=8, samples_per_epoch=48,
                   learning_rate=3e-3, **fresh)
    wf.run()
    wf.finalize()
    resumed = torch.load(models / "tile_seg_resume.pt", weights_only=True)["network"]
    uninterrupted = torch.load(Path(fresh["ckpt_dir"]) / "tile_seg_resume.pt", weights_only=True)["network"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    assert _workflow("infer_tile_seg.json", "infer", **o).check_properties() == []
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           f"['{COMMON}','{CONFIGS / 'infer_tile_seg.json'}']", "--dataset_dir", o["dataset_dir"],
           "--output_dir", o["output_dir"], "--ckpt_dir", o["ckpt_dir"], "--tile_size", str(TILE),
           "--num_workers", "0", "--min_object_um2", "200.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    heat = Path(o["output_dir"]) / "heatmaps_tile_seg"
    summary = json.loads((heat / "inference_summary.json").read_text())
    assert list(summary["slides"]) == ["test_000"] and summary["failed"] == {}
    d = heat / "test_000"
    for suffix in ("_heatmap.tif", "_overlay.png", "_tumor.geojson", "_pixel_mask.png", "_pixel_prob.npy",
                   "_prob.npy", "_prob.png", "_labels.npy", "_record.json"):
        assert (d / f"test_000{suffix}").is_file(), suffix
    record = json.loads((d / "test_000_record.json").read_text())
    assert record["method"] == "tile_segmentation" and record["cell_size"] == 64.0 and record["mpp"] == 0.5
    assert record["pixel_shape"] == [512, 512] and record["pixel_downsample"] == 2.0
    assert record["tiles"] < record["positions"]  # background tiles were not inferred

    # the pixel mask against the rasterised annotation: well above an all-tissue-is-tumor guess
    prob = np.load(d / "test_000_pixel_prob.npy")
    tissue = ~np.isnan(prob)
    truth = json.loads(tiny["manifest"].read_text())["slides"][-1]
    labels = SlideLabels.from_file(tiny["root"] / "data" / truth["asap_xml"], (1024, 1024), 2.0)
    tumor = labels.mask((512, 512), 2.0) == MASK_TUMOR
    prevalence = (tumor & tissue).sum() / tissue.sum()
    chance = 2 * prevalence / (1 + prevalence)
    assert record["pixel_dice"] > max(0.55, chance + 0.2), (record["pixel_dice"], chance)

    # the outputs line up with the slide: TIFF at downsample 2 covering the slide, regions inside it
    import tifffile

    with tifffile.TiffFile(d / "test_000_heatmap.tif") as tif:
        meta = json.loads(tif.pages[0].description)
        assert meta["downsample"] == 2 and meta["slide_size"] == [1024, 1024] and tif.pages[0].shape == (512, 512)
    regions = read_annotations(d / "test_000_tumor.geojson")
    assert regions and len(regions) == record["n_regions"]
    for r in regions:
        assert r.exterior.min() >= 0 and r.exterior.max() <= 1024

    # evaluate.json scores the folder with every existing metric
    ev = _workflow("evaluate.json", None, output_dir=o["output_dir"], heatmap_dir=str(heat),
                   truth_dir=str(tiny["manifest"]))
    ev.run()
    overall = json.loads((heat / "metrics_overall.json").read_text())
    per_slide = json.loads((heat / "metrics_per_slide.json").read_text())[0]
    majority = max(per_slide["n_tumor"], per_slide["n"] - per_slide["n_tumor"]) / per_slide["n"]
    assert per_slide["n"] > 30 and per_slide["n_tumor"] > 5
    assert overall["pooled_accuracy"] > majority + 0.1, (overall["pooled_accuracy"], majority)
    assert overall["pooled_roc_auc"] > 0.75, overall
    assert overall["froc"] is not None and per_slide["truth"] is not None
