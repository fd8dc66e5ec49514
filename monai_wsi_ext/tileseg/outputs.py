"""Outputs of tile segmentation: the canvas method's files from the pixel mask, the patch-grid probabilities the
evaluation scores, and the pixel-level Dice.

Per slide, ``<output_dir>/<slide_id>/`` gets (all atomic, the record last, through
:mod:`monai_wsi_ext.outputs.writers`):

* ``<id>_heatmap.tif``: the post-processed tumor probability at the target resolution as a pyramidal TIFF aligned
  with the slide (:func:`~monai_wsi_ext.outputs.writers.write_heatmap_tiff` with one "cell" per target pixel; its
  base level has the largest power-of-two downsample not above the target's, so it is about the target size);
* ``<id>_overlay.png``: that map over the slide thumbnail, tumor regions outlined
  (:func:`~monai_wsi_ext.outputs.writers.write_overlay_png`);
* ``<id>_tumor.geojson``: the tumor mask's regions as QuPath polygons with holes, level-0 coordinates
  (:func:`~monai_wsi_ext.outputs.writers.tumor_regions` on the pixel mask, optionally reduced by
  ``region_downsample``; :func:`~monai_wsi_ext.outputs.writers.write_regions_geojson`);
* ``<id>_pixel_mask.png`` (0/255 tumor mask at the target resolution) and ``<id>_pixel_prob.npy`` (the
  post-processed probability, float32, NaN off tissue; optional);
* ``<id>_prob.npy`` / ``<id>_prob.png`` / ``<id>_labels.npy``: the probability of every cell of the slide's patch
  grid (the mean of the pixel probability over the cell, NaN where the grid keeps no cell) and the grid's labels,
  the layout :func:`~monai_wsi_ext.evaluation.report.load_heatmap_dir` reads, so ``evaluate.json`` applies every
  existing metric (patch accuracy, PR/ROC-AUC, Dice on the grid, tumor points, FROC, slide scores);
* ``<id>_record.json``: the run record (:func:`~monai_wsi_ext.outputs.writers.write_run_record`) with the grid's
  ``cell_size``, ``mpp`` and ``slide_size`` (what the evaluation reads), the slide score of the grid, the regions,
  the target resolution, the tiles inferred, the post-processing and, when a truth mask is given, the pixel-level
  Dice (``pixel_dice``, ``pixel_tp``/``pixel_fp``/``pixel_fn``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine
from monai.utils.enums import CommonKeys as Keys

from monai_wsi_ext.baselines.segmentation import cell_means
from monai_wsi_ext.engines.handlers import SlideOutputWriter, slide_batch_item
from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.evaluation.metrics import dice
from monai_wsi_ext.evaluation.report import find_truth, load_truth_mask
from monai_wsi_ext.io.atomic import atomic_open, remove_stale_temporaries, write_npy_atomic
from monai_wsi_ext.labels import MASK_TUMOR
from monai_wsi_ext.model.predict import prob_grid
from monai_wsi_ext.outputs.writers import (
    choose_heatmap_downsample,
    slide_score,
    slide_status,
    tumor_regions,
    write_heatmap_tiff,
    write_overlay_png,
    write_prob_npy,
    write_prob_png,
    write_regions_geojson,
    write_run_record,
)
from monai_wsi_ext.prep.grid import PatchGrid, cell_fractions
from monai_wsi_ext.tileseg.masks import SlideLabels, sample_mask
from monai_wsi_ext.tileseg.postprocess import PostprocessResult, TileSegPostprocess
from monai_wsi_ext.tileseg.tiles import prepared_tissue

__all__ = ["grid_probabilities", "pixel_dice", "region_map", "pixel_truth", "write_tile_seg_outputs",
           "TileSegWriter"]

logger = logging.getLogger(__name__)


def grid_probabilities(prob: np.ndarray, downsample: float, grid: PatchGrid) -> np.ndarray:
    """The patch grid's probabilities: the mean of a pixel probability mask over each kept cell.

    A cell covers ``cell_size / downsample`` target pixels per side: an exact block mean when that is a whole
    number (:func:`~monai_wsi_ext.baselines.segmentation.cell_means`), otherwise the mean of up to 32 x 32 sample
    points (:func:`~monai_wsi_ext.prep.grid.cell_fractions`). NaN pixels (off tissue, not inferred) count as 0.

    Args:
        prob: ``(H, W)`` probability at ``downsample`` level-0 pixels per pixel.
        downsample: level-0 pixels per pixel.
        grid: the slide's patch grid.

    Returns:
        ``grid.shape`` float32, NaN where the grid keeps no cell.
    """
    rows, cols = grid.shape
    if len(grid) == 0:
        return np.full((rows, cols), np.nan, np.float32)
    p = np.nan_to_num(np.asarray(prob, np.float32), nan=0.0)
    ppc = float(grid.cell_size) / float(downsample)
    whole = round(ppc)
    if abs(ppc - whole) < 1e-6 and whole >= 1 and p.shape[0] >= rows * whole and p.shape[1] >= cols * whole:
        means = cell_means(p, int(whole), grid.shape)
    else:
        samples = int(min(32, max(4, math.ceil(ppc))))
        means = cell_fractions(p, float(downsample), rows, cols, float(grid.cell_size), samples=samples)
    return prob_grid(means[grid.rows, grid.cols], grid.rows, grid.cols, grid.shape)


def pixel_dice(mask: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Pixel-level Dice of a tumor mask against a truth mask of the same pixels
    (:func:`~monai_wsi_ext.evaluation.metrics.dice`; None when both are empty), with the pixel counts."""
    mask, truth = np.asarray(mask, bool), np.asarray(truth, bool)
    value = dice(mask.astype(np.float32), truth, threshold=0.5)
    tp = int((mask & truth).sum())
    return {"pixel_dice": None if not math.isfinite(value) else float(value), "pixel_tp": tp,
            "pixel_fp": int(mask.sum()) - tp, "pixel_fn": int(truth.sum()) - tp}


def region_map(prob: np.ndarray, factor: int = 1) -> np.ndarray:
    """``prob`` reduced by an integer ``factor`` for the GeoJSON outlines: the maximum of each block (NaN-aware, so
    small regions survive), NaN for blocks without tissue; ``factor`` 1 returns ``prob``."""
    factor = int(factor)
    if factor <= 1:
        return prob
    h, w = prob.shape
    ph, pw = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
    padded = np.full((ph, pw), np.nan, np.float32)
    padded[:h, :w] = prob
    blocks = padded.reshape(ph // factor, factor, pw // factor, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        return np.nanmax(blocks, axis=(1, 3)).astype(np.float32)


def pixel_truth(prepared, shape: Sequence[int], downsample: float, truth: str | os.PathLike | None = "annotation",
                cache: dict | None = None, class_map: Mapping[str, str] | None = None
                ) -> tuple[np.ndarray | None, str | None]:
    """The truth tumor mask of a slide at the target resolution, and where it came from.

    Args:
        prepared: the :class:`~monai_wsi_ext.prep.prepare.PreparedSlide`.
        shape: ``(rows, cols)`` of the target grid.
        downsample: its level-0 pixels per pixel.
        truth: ``"annotation"`` (the slide's own annotation file, rasterised at the target resolution), a truth
            folder or manifest (:func:`~monai_wsi_ext.evaluation.report.find_truth`: ``_truth.npz``, label masks,
            polygon files), or None (no truth).
        cache: look-up cache for a truth folder.
        class_map: class-name mapping of polygon files.

    Returns:
        ``(bool mask, source)`` or ``(None, None)`` when the slide has no truth.
    """
    if truth is None:
        return None, None
    size = prepared.dimensions
    if str(truth) == "annotation":
        path = prepared.meta.get("annotation")
        if not path:
            return None, None
        labels = SlideLabels.from_file(path, size, downsample, class_map=class_map)
        return labels.mask(shape, downsample) == MASK_TUMOR, str(path)
    path = find_truth(prepared.slide_id, truth, cache if cache is not None else {})
    if path is None:
        return None, None
    mask = load_truth_mask(path, size, mask_downsample=downsample, class_map=class_map)
    return sample_mask(mask.tumor, mask.downsample, shape, downsample, fill=False), str(path)


def _save_mask_png(path: Path, mask: np.ndarray) -> Path:
    from PIL import Image

    with atomic_open(path) as f:
        Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(f, format="PNG", compress_level=1)
    return path


def write_tile_seg_outputs(
    out_dir: str | os.PathLike, slide_id: str, result: PostprocessResult, downsample: float, target_mpp: float,
    slide_size: Sequence[int], mpp: float | None, grid: PatchGrid | None, thumbnail: np.ndarray | None,
    thumbnail_downsample: float | None, truth: np.ndarray | None = None, truth_source: str | None = None,
    config: dict | None = None, weights: Mapping[str, str | os.PathLike] | None = None, region_downsample: int = 1,
    write_pixel_prob: bool = True, extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every output of one slide (see the module docstring), the record last.

    The slide's previous record and the optional files this call does not write are removed first, so a folder
    with outputs but no record is incomplete (the evaluation skips it) and never a mix of two runs.

    Args:
        out_dir: the slide's folder (created).
        slide_id: the slide id (file-name stem).
        result: the post-processed probability and mask at the target resolution.
        downsample: level-0 pixels per target pixel.
        target_mpp: µm per target pixel.
        slide_size: level-0 ``(width, height)``.
        mpp: level-0 µm/px.
        grid: the slide's patch grid (None: no grid-level files, the evaluation cannot score the slide).
        thumbnail: RGB thumbnail for the overlay (None: no overlay).
        thumbnail_downsample: level-0 pixels per thumbnail pixel.
        truth: bool truth tumor mask at the target resolution (pixel Dice), or None.
        truth_source: where ``truth`` came from (recorded).
        config: configuration to record (and hash).
        weights: name -> weights file, hashed into the record.
        region_downsample: integer reduction of the mask before outlining the GeoJSON regions (1: pixel-exact).
        write_pixel_prob: also write ``<id>_pixel_prob.npy``.
        extra: further record entries (tiles, seconds...).

    Returns:
        ``{name: Path}`` of the files, plus ``slide_score``, ``status``, ``n_regions``, ``pixel_dice``.
    """
    slide_id = str(slide_id)
    if not slide_id or slide_id in (".", "..") or "/" in slide_id or os.sep in slide_id:
        raise ValueError(f"`slide_id` must be a plain file-name stem, got {slide_id!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threshold = float(result.threshold)
    paths: dict[str, Path | None] = {
        "heatmap_tiff": out / f"{slide_id}_heatmap.tif",
        "overlay_png": out / f"{slide_id}_overlay.png" if thumbnail is not None else None,
        "tumor_geojson": out / f"{slide_id}_tumor.geojson",
        "pixel_mask_png": out / f"{slide_id}_pixel_mask.png",
        "pixel_prob_npy": out / f"{slide_id}_pixel_prob.npy" if write_pixel_prob else None,
        "prob_npy": out / f"{slide_id}_prob.npy" if grid is not None else None,
        "prob_png": out / f"{slide_id}_prob.png" if grid is not None else None,
        "labels_npy": out / f"{slide_id}_labels.npy" if grid is not None else None,
        "record_json": out / f"{slide_id}_record.json",
    }
    remove_stale_temporaries(out)
    paths["record_json"].unlink(missing_ok=True)
    for key, suffix in (("overlay_png", "_overlay.png"), ("pixel_prob_npy", "_pixel_prob.npy"),
                        ("prob_npy", "_prob.npy"), ("prob_png", "_prob.png"), ("labels_npy", "_labels.npy")):
        if paths[key] is None:
            (out / f"{slide_id}{suffix}").unlink(missing_ok=True)
    prob = result.prob
    info = write_heatmap_tiff(paths["heatmap_tiff"], prob, downsample, slide_size, mpp=mpp,
                              downsample=choose_heatmap_downsample(downsample, pixels_per_cell=1))
    if thumbnail is not None:
        write_overlay_png(paths["overlay_png"], thumbnail, thumbnail_downsample, prob, downsample, threshold=threshold)
    k = max(int(region_downsample), 1)
    regions = tumor_regions(region_map(prob, k), downsample * k, threshold=threshold, mpp=mpp)
    write_regions_geojson(paths["tumor_geojson"], regions)
    _save_mask_png(paths["pixel_mask_png"], result.mask)
    if paths["pixel_prob_npy"] is not None:
        write_npy_atomic(paths["pixel_prob_npy"], prob)
    grid_prob, score, status = None, None, "no_tissue" if not result.tissue.any() else "ok"
    if grid is not None:
        grid_prob = grid_probabilities(prob, downsample, grid)
        write_prob_npy(paths["prob_npy"], grid_prob)
        write_prob_png(paths["prob_png"], grid_prob)
        write_npy_atomic(paths["labels_npy"], grid.label_grid())
        score, status = slide_score(grid_prob), slide_status(grid_prob)
    dice_info = pixel_dice(result.mask, truth) if truth is not None else {}
    record = write_run_record(
        paths["record_json"], config=config, weights={k_: v for k_, v in (weights or {}).items() if v},
        method="tile_segmentation", slide_id=slide_id, slide_size=[int(s) for s in slide_size], mpp=mpp,
        cell_size=None if grid is None else float(grid.cell_size),
        grid_shape=None if grid is None else list(grid.shape), threshold=threshold, slide_score=score,
        status=status, score_method="smoothed_max", target_mpp=float(target_mpp), pixel_downsample=float(downsample),
        pixel_shape=list(prob.shape), postprocess=result.summary(), n_regions=len(regions),
        regions=[{key: r[key] for key in ("id", "n_cells", "area_px", "area_mm2", "mean_probability",
                                          "max_probability", "bbox")} for r in regions],
        region_downsample=k, heatmap_downsample=info.downsample,
        heatmap_level_sizes=[list(s) for s in info.level_sizes], pixel_truth=truth_source, **dice_info,
        **dict(extra or {}), outputs={key: (None if v is None else v.name) for key, v in paths.items()},
    )
    logger.info("Slide %s: %d tumor region(s), %d tumor px at %g µm/px, slide score %s%s -> %s", slide_id,
                len(regions), int(result.mask.sum()), target_mpp, "none" if score is None else f"{score:.4f}",
                "" if not dice_info else f", pixel Dice {dice_info['pixel_dice']}", out)
    return {**paths, "slide_score": score, "status": status, "n_regions": len(regions),
            "pixel_dice": dice_info.get("pixel_dice"), "record": record}


class TileSegWriter(SlideOutputWriter):
    """After each slide of ``infer_tile_seg.json``: post-process the inferer's probability mask
    (:class:`~monai_wsi_ext.tileseg.postprocess.TileSegPostprocess`) and write the slide's outputs
    (:func:`write_tile_seg_outputs`) under ``<output_dir>/<slide_id>/``.

    A slide whose outputs cannot be written is recorded in ``engine.state.failed`` like a slide that failed
    inference (the :class:`~monai_wsi_ext.outputs.handlers.InferenceSummary` then reports it);
    ``engine.state.results`` collects the written slides (score, regions, pixel Dice, tiles, seconds).

    Args:
        output_dir: one folder per slide below it.
        postprocess: the post-processing (default: :class:`~monai_wsi_ext.tileseg.postprocess.TileSegPostprocess`).
        truth: ``"annotation"`` (the slide's annotation), a truth folder or manifest, or None: the truth of the
            pixel-level Dice (:func:`pixel_truth`).
        class_map: class-name mapping of polygon truth files.
        thumbnail_size: longest side of the overlay's thumbnail.
        region_downsample: see :func:`write_tile_seg_outputs`.
        write_pixel_prob: also write ``<id>_pixel_prob.npy``.
        config: configuration to record.
        weights: name -> weights file, hashed into the records.
        backend: reader backend for the thumbnail when the slide is not open any more.
    """

    def __init__(self, output_dir: str, postprocess: TileSegPostprocess | None = None,
                 truth: str | None = "annotation", class_map: Mapping[str, str] | None = None,
                 thumbnail_size: int = 2048, region_downsample: int = 1, write_pixel_prob: bool = True,
                 config: dict | None = None, weights: Mapping[str, str] | None = None, backend: str = "auto"):
        self.output_dir = Path(output_dir)
        self.postprocess = postprocess if postprocess is not None else TileSegPostprocess()
        self.truth, self.class_map, self.thumbnail_size = truth, class_map, int(thumbnail_size)
        self.region_downsample, self.write_pixel_prob = int(region_downsample), bool(write_pixel_prob)
        self.config, self.weights, self.backend = config, dict(weights or {}), backend
        self._cache: dict = {}

    def write(self, prepared, pred: Mapping[str, Any]) -> dict[str, Any]:
        """Post-process and write one slide from the inferer's output ``pred``."""
        prob, ds, target_mpp = pred["pixel_prob"], float(pred["downsample"]), float(pred["target_mpp"])
        shape = prob.shape
        tissue = prepared_tissue(prepared, self.backend)
        tissue_px = sample_mask(tissue.mask, tissue.downsample, shape, ds, fill=False)
        result = self.postprocess(prob, tissue_px, pixel_um=target_mpp)
        truth, source = pixel_truth(prepared, shape, ds, self.truth, self._cache, self.class_map)
        thumb, thumb_ds = prepared.open(self.backend).thumbnail(max_size=self.thumbnail_size)
        extra = {key: pred[key] for key in ("tiles", "positions", "seconds") if key in pred}
        return write_tile_seg_outputs(self.output_dir / prepared.slide_id, prepared.slide_id, result, ds, target_mpp,
                                      prepared.dimensions, prepared.mpp, prepared.grid, thumb, thumb_ds, truth,
                                      source, config=self.config, weights=self.weights,
                                      region_downsample=self.region_downsample,
                                      write_pixel_prob=self.write_pixel_prob, extra=extra)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None or out.get(Keys.PRED) is None:
            return  # failed slide, already recorded
        item = slide_batch_item(engine)
        prepared, sid = item["prepared"], item["slide_id"]
        try:
            written = self.write(prepared, out[Keys.PRED])
        except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
            engine.state.failed[sid] = f"{type(e).__name__}: {e}"
            logger.error("%s: writing the tile segmentation outputs failed (%s)", sid, e)
            return
        seconds = self._seconds()
        engine.state.results[sid] = {"slide_score": written["slide_score"], "status": written["status"],
                                     "n_regions": written["n_regions"], "pixel_dice": written["pixel_dice"],
                                     "tiles": out[Keys.PRED].get("tiles"), "seconds": seconds,
                                     "dir": str(self.output_dir / sid)}
