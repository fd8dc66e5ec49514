"""Tests of tissue detection (monai_wsi_ext.prep.tissue) and the patch grid and its labels (monai_wsi_ext.prep.grid), against
the synthetic generator's ground truth, hand-made masks and the real slides."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from monai_wsi_ext.prep.grid import (
    PatchGrid,
    PatchLabel,
    cell_fractions,
    label_cells,
    make_grid,
    read_patch_table,
    write_patch_table,
)
from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, prepare_slide
from monai_wsi_ext.prep.tissue import TissueMask, detect_tissue, load_mask_png, save_mask_png, tissue_mask_from_image
from monai_wsi_ext.io.wsi import open_slide


def _truth(record) -> tuple[dict, int]:
    with np.load(record["truth"]) as z:
        return {k: z[k] for k in ("tissue", "tumor")}, int(z["downsample"])


def _resample_to(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resample of a bool mask to ``shape`` (pixel centres)."""
    ys = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int)
    xs = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int)
    return mask[np.ix_(ys, xs)]


# ------------------------------------------------------------------------------------------- against the truth
@pytest.mark.parametrize("index", [0, 1, 2])
def test_otsu_mask_matches_truth_tissue(synthetic_dataset, index):
    record = synthetic_dataset.records[index]
    truth, _ = _truth(record)
    with open_slide(record["image"]) as slide:
        tissue = detect_tissue(slide, max_size=768)  # level 1 of the 1536 px slide
    assert tissue.mask.shape == (768, 768) and tissue.downsample == pytest.approx(2.0)
    assert tissue.channel == "saturation" and tissue.threshold >= 0.05
    pred = _resample_to(tissue.mask, truth["tissue"].shape)
    iou = (pred & truth["tissue"]).sum() / (pred | truth["tissue"]).sum()
    assert iou > 0.9, f"IoU {iou:.3f}"
    assert 0.2 < tissue.fraction < 0.6


@pytest.mark.parametrize("index", [0, 1, 2])
def test_grid_keeps_cells_with_truth_tissue(synthetic_dataset, index):
    record = synthetic_dataset.records[index]
    truth, ds = _truth(record)
    patch = synthetic_dataset.patch_size
    with open_slide(record["image"]) as slide:
        tissue = detect_tissue(slide, max_size=768)
        grid = make_grid(record["id"], slide.dimensions, tissue.mask, tissue.downsample, patch, 0, 1.0, 0.8)
    assert grid.shape == (1536 // patch, 1536 // patch) and grid.cell_size == patch
    truth_frac = cell_fractions(truth["tissue"], ds, *grid.shape, patch)
    kept = np.zeros(grid.shape, bool)
    kept[grid.rows, grid.cols] = True
    agreement = (kept == (truth_frac >= 0.8)).mean()
    assert agreement > 0.95, f"agreement {agreement:.3f}"
    assert len(grid) > 50
    # the positions follow the cells
    np.testing.assert_array_equal(grid.x, grid.cols * patch)
    np.testing.assert_array_equal(grid.y, grid.rows * patch)
    assert (grid.tissue >= 0.8).all()


def test_labels_from_asap_match_truth_tumor(synthetic_dataset, prepared_dataset):
    out, summary = prepared_dataset
    patch = synthetic_dataset.patch_size
    total_tumor = 0
    for record in synthetic_dataset.records:
        truth, ds = _truth(record)
        grid = read_patch_table(out / record["id"] / "patches.csv")
        assert len(grid) > 0
        tumor_frac = cell_fractions(truth["tumor"], ds, 1536 // patch, 1536 // patch, patch)[grid.rows, grid.cols]
        expected = tumor_frac >= 0.2
        agreement = (expected == (grid.labels == PatchLabel.TUMOR)).mean()
        assert agreement > 0.97, f"{record['id']}: agreement {agreement:.3f}"
        n_tumor = int((grid.labels == PatchLabel.TUMOR).sum())
        assert n_tumor == summary["slides"][record["id"]]["counts"]["tumor"]
        total_tumor += n_tumor
        # exhaustive annotation: kept cells away from tumor are normal
        far = tumor_frac == 0
        assert (grid.labels[far] == PatchLabel.NORMAL).mean() > 0.95
    assert total_tumor > 0


# ------------------------------------------------------------------------------------------- hand values
def test_cell_fractions_hand_values():
    mask = np.zeros((4, 6), bool)
    mask[0:2, 0:2] = True  # cell (0, 0) full
    mask[0, 2] = True  # cell (0, 1): 1 of 4 pixels
    mask[2:4, 4] = True  # cell (1, 2): 2 of 4 pixels
    frac = cell_fractions(mask, mask_downsample=2.0, rows=2, cols=3, cell_size=4.0, samples=2)
    np.testing.assert_allclose(frac, [[1.0, 0.25, 0.0], [0.0, 0.0, 0.5]])
    # finer sampling of the same mask gives the same area fractions
    np.testing.assert_allclose(cell_fractions(mask, 2.0, 2, 3, 4.0, samples=8), frac)


def test_make_grid_on_hand_made_square():
    # 16 x 16 mask at downsample 8 over a 128 x 128 slide; cells of 16 px -> 8 x 8 grid; tissue = 4 x 4 cells
    mask = np.zeros((16, 16), bool)
    mask[4:12, 6:14] = True  # level-0 rows 32..95, cols 48..111 -> cells rows 2..5, cols 3..6
    grid = make_grid("square", (128, 128), mask, 8.0, patch_size=16, tissue_threshold=0.8)
    assert grid.shape == (8, 8) and len(grid) == 16
    assert set(zip(grid.rows.tolist(), grid.cols.tolist())) == {(r, c) for r in range(2, 6) for c in range(3, 7)}
    np.testing.assert_allclose(grid.tissue, 1.0)
    assert grid.counts() == {"cells": 16, "tumor": 0, "normal": 0, "nolabel": 16}
    # a partial border: shift the square by half a cell -> edge cells have 50 % tissue
    shifted = np.zeros((16, 16), bool)
    shifted[5:13, 6:14] = True  # rows 40..103: rows 2 and 6 half covered
    assert len(make_grid("s", (128, 128), shifted, 8.0, 16, tissue_threshold=0.8)) == 12
    assert len(make_grid("s", (128, 128), shifted, 8.0, 16, tissue_threshold=0.5)) == 20
    assert len(make_grid("s", (128, 128), shifted, 8.0, 16, tissue_threshold=0.0)) == 64
    # only whole cells: a 130 x 100 slide still has 8 x 6 cells; level 1 (downsample 2) doubles the cell
    assert make_grid("s", (130, 100), mask, 8.0, 16).shape == (6, 8)
    g1 = make_grid("s", (128, 128), mask, 8.0, patch_size=16, level=1, level_downsample=2.0)
    assert g1.cell_size == 32 and g1.shape == (4, 4) and g1.level == 1
    with pytest.raises(ValueError, match="patch_size"):
        make_grid("s", (128, 128), mask, 8.0, patch_size=0)
    with pytest.raises(ValueError, match="tissue_threshold"):
        make_grid("s", (128, 128), mask, 8.0, 16, tissue_threshold=1.5)


def test_label_cells_hand_values():
    tissue = np.ones((8, 8), bool)
    grid = make_grid("l", (64, 64), tissue, 8.0, patch_size=16)  # 4 x 4 cells, all kept
    label = np.zeros((8, 8), np.uint8)  # downsample 8: one label pixel = 8 x 8 level-0 px, 2 x 2 per cell
    label[0:2, 0:2] = 2  # cell (0, 0): all tumor
    label[2, 2] = 2  # cell (1, 1): 1/4 tumor -> tumor (>= 0.2)
    label[4:6, 4] = 2  # cell (2, 2): 1/2 tumor
    label[6:8, 6:8] = 1  # cell (3, 3): annotated normal
    label_cells(grid, label, 8.0, exhaustive=False)
    g = grid.label_grid()
    assert g[0, 0] == g[1, 1] == g[2, 2] == PatchLabel.TUMOR
    assert g[3, 3] == PatchLabel.NORMAL
    assert (g == PatchLabel.NOLABEL).sum() == 12  # not exhaustive: unannotated tissue has no label
    label_cells(grid, label, 8.0, tissue, 8.0, exhaustive=True, tumor_threshold=0.3)
    g = grid.label_grid()
    assert g[0, 0] == g[2, 2] == PatchLabel.TUMOR
    assert g[1, 1] == PatchLabel.NOLABEL  # 25 % tumor, 75 % normal: neither threshold reached
    assert (g == PatchLabel.NORMAL).sum() == 13
    np.testing.assert_allclose(grid.tumor[(grid.rows == 2) & (grid.cols == 2)], [0.5])
    with pytest.raises(ValueError, match="exhaustive"):
        label_cells(grid, label, 8.0, exhaustive=True)


def test_patch_table_round_trip(tmp_path):
    grid = PatchGrid("s1", level=1, patch_size=32, cell_size=64.0, shape=(5, 7), rows=np.array([0, 2, 4]),
                     cols=np.array([6, 3, 1]), tissue=np.array([0.9, 1.0, 0.85], np.float32),
                     tumor=np.array([0.0, 0.5, 0.0], np.float32), normal=np.array([0.9, 0.5, 0.85], np.float32),
                     labels=np.array([0, 1, 0]))
    path = write_patch_table(tmp_path / "patches.csv", grid)
    back = read_patch_table(path, shape=(5, 7), cell_size=64.0)
    for key in ("rows", "cols", "labels"):
        np.testing.assert_array_equal(getattr(back, key), getattr(grid, key))
    np.testing.assert_allclose(back.tumor, grid.tumor)
    np.testing.assert_array_equal(back.x, [384, 192, 64])
    assert back.level == 1 and back.patch_size == 32 and back.shape == (5, 7)
    assert [p.name for p in tmp_path.iterdir()] == ["patches.csv"]


# ------------------------------------------------------------------------------------------- masks
def test_external_mask_option(tmp_path, synthetic_slide):
    ext = np.zeros((100, 100), np.uint8)
    ext[:, 50:] = 255  # right half is "tissue"
    path = tmp_path / "mask.png"
    Image.fromarray(ext).save(path)
    with open_slide(synthetic_slide) as slide:
        tissue = detect_tissue(slide, max_size=400, external_mask=path)
    assert tissue.channel == "external" and tissue.threshold is None
    assert tissue.mask.shape == (384, 384) and tissue.downsample == pytest.approx(4.0)
    assert tissue.mask[:, 192:].all() and not tissue.mask[:, :192].any()
    grid = make_grid("ext", (1536, 1536), tissue.mask, tissue.downsample, 64)
    assert len(grid) == 24 * 12 and grid.cols.min() == 12
    # through prepare_slide
    meta = prepare_slide(SlideInput(image=str(synthetic_slide), tissue_mask=str(path), slide_id="ext"), tmp_path,
                         PrepareConfig(patch_size=64, thumbnail_max_size=400))
    assert meta["counts"]["cells"] == 288
    with pytest.raises(Exception, match="mask"):
        detect_tissue(open_slide(synthetic_slide), external_mask=tmp_path / "missing.png")


def test_blank_image_gives_empty_mask():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 2, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask_from_image(glass).mask.sum() == 0
    stained = glass.copy()
    stained[50:150, 100:200] = (180, 90, 160)
    m = tissue_mask_from_image(stained, min_object_px=10, min_hole_px=10)
    assert m.mask[50:150, 100:200].all() and m.mask.sum() == 100 * 100


def test_mask_png_round_trip(tmp_path):
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:35] = True
    tm = TissueMask(mask=mask, downsample=12.5, threshold=0.123, channel="od")
    path = save_mask_png(tmp_path / "tissue_mask.png", tm)
    back = load_mask_png(path)
    np.testing.assert_array_equal(back.mask, mask)
    assert back.downsample == 12.5 and back.threshold == pytest.approx(0.123) and back.channel == "od"
    assert [p.name for p in tmp_path.iterdir()] == ["tissue_mask.png"]


def _hsv_cases(shared_data) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    # flat (grey, black, white) pixels and ties between the largest channels
    noise[:8, :8], noise[8:16, :8], noise[16:24, :8] = 128, 0, 255
    noise[24:32, :8], noise[32:40, :8], noise[40:48, :8] = (200, 200, 10), (10, 200, 200), (200, 10, 200)
    with open_slide(shared_data / "slides/cmu_small_region.svs") as slide:
        thumb, _ = slide.thumbnail(max_size=512)
    return [noise, np.ascontiguousarray(thumb[..., :3])]


def test_rgb_to_hsv_is_scikit_image_bit_for_bit(shared_data):
    """The per-plane HSV of tissue detection equals skimage.color.rgb2hsv on the same float32 input exactly, so
    masks and ink are unchanged by the faster path."""
    from skimage import color

    from monai_wsi_ext.prep.tissue import rgb_to_hsv

    for image in _hsv_cases(shared_data):
        ref = color.rgb2hsv(image.astype(np.float32) / 255.0)
        for i, plane in enumerate(rgb_to_hsv(image)):
            assert plane.dtype == np.float32 and plane.shape == image.shape[:2]
            np.testing.assert_array_equal(plane, ref[..., i])


# ------------------------------------------------------------------------------------------- real slides
def test_cmu_tissue_and_grid(shared_data):
    with open_slide(shared_data / "slides/cmu_small_region.svs") as slide:
        tissue = detect_tissue(slide, max_size=1024)
        assert 0.1 < tissue.fraction < 0.9
        grid = make_grid("cmu", slide.dimensions, tissue.mask, tissue.downsample, 256)
    assert grid.shape == (2967 // 256, 2220 // 256)
    assert len(grid) > 0
    assert (grid.x + 256 <= 2220).all() and (grid.y + 256 <= 2967).all()


def test_blank_flat_tiff_gives_no_cells_and_a_warning(shared_data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="monai_wsi_ext.prep.prepare"):
        meta = prepare_slide(SlideInput(image=str(shared_data / "slides/kidney-48-5.tif")), tmp_path,
                             PrepareConfig(patch_size=256))
    assert meta["counts"]["cells"] <= 2
    assert meta["mpp"] is None and meta["grid_shape"] == [901 // 256, 1493 // 256]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("kidney-48-5.tif" in m and "no patch-grid cell" in m for m in messages)
    assert (tmp_path / "kidney-48-5" / "meta.json").exists()

