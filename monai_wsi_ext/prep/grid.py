"""The patch grid: non-overlapping cells over the slide, their tissue fraction and their label.

A cell ``(row, col)`` covers level-0 pixels ``x in [col * cell, (col + 1) * cell)`` and
``y in [row * cell, (row + 1) * cell)`` where ``cell = patch_size * downsample(level)``. Only whole cells inside
the slide exist. A cell is kept when its tissue fraction reaches ``tissue_threshold``.

Labels follow the paper: ``tumor`` (1) when the tumor fraction is at least ``tumor_threshold``, ``normal`` (0)
when the normal fraction is at least ``normal_threshold``, otherwise ``nolabel`` (-1). The codes are defined in
:mod:`monai_wsi_ext.labels`; :class:`PatchLabel` is importable from here too.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monai_wsi_ext.io.atomic import atomic_path
from monai_wsi_ext.labels import LABEL_BACKGROUND, MASK_NORMAL, MASK_TUMOR, PatchLabel

__all__ = ["PatchLabel", "PatchGrid", "cell_fractions", "make_grid", "label_cells", "write_patch_table",
           "read_patch_table", "PATCH_TABLE_COLUMNS"]


PATCH_TABLE_COLUMNS = ("slide_id", "row", "col", "x", "y", "level", "patch_size", "tissue", "tumor", "normal",
                       "label")


def cell_fractions(mask: np.ndarray, mask_downsample: float, rows: int, cols: int, cell_size: float,
                   samples: int = 8) -> np.ndarray:
    """Fraction of each grid cell covered by ``mask``, estimated on ``samples x samples`` points per cell.

    Args:
        mask: ``(h, w)`` bool (or 0/1) mask whose pixel covers ``mask_downsample`` level-0 pixels.
        mask_downsample: level-0 pixels per mask pixel.
        rows: grid rows.
        cols: grid columns.
        cell_size: level-0 size of a cell.
        samples: sample points per cell side (the estimate's resolution is ``1 / samples**2``).

    Returns:
        ``(rows, cols)`` float32 array in [0, 1].
    """
    offs = (np.arange(samples) + 0.5) * (cell_size / samples)
    ys = (np.arange(rows)[:, None] * cell_size + offs[None, :]).ravel()
    xs = (np.arange(cols)[:, None] * cell_size + offs[None, :]).ravel()
    iy = np.clip((ys / mask_downsample).astype(np.int64), 0, mask.shape[0] - 1)
    ix = np.clip((xs / mask_downsample).astype(np.int64), 0, mask.shape[1] - 1)
    sampled = np.asarray(mask, dtype=np.float32)[np.ix_(iy, ix)]
    return sampled.reshape(rows, samples, cols, samples).mean(axis=(1, 3))


@dataclass
class PatchGrid:
    """The kept cells of one slide.

    Attributes:
        slide_id: identifier used in tables and outputs.
        level: pyramid level the patches are read at.
        patch_size: patch side in pixels at ``level``.
        cell_size: cell side in level-0 pixels.
        shape: full grid ``(rows, cols)`` over the slide.
        rows, cols: grid position of each kept cell.
        tissue: tissue fraction of each kept cell.
        tumor, normal: annotation fractions of each kept cell (0 when the slide has no annotation).
        labels: :class:`PatchLabel` code of each kept cell.
    """

    slide_id: str
    level: int
    patch_size: int
    cell_size: float
    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    tissue: np.ndarray
    tumor: np.ndarray = field(default=None)
    normal: np.ndarray = field(default=None)
    labels: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.rows)
        if self.tumor is None:
            self.tumor = np.zeros(n, np.float32)
        if self.normal is None:
            self.normal = np.zeros(n, np.float32)
        if self.labels is None:
            self.labels = np.full(n, PatchLabel.NOLABEL, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def x(self) -> np.ndarray:
        """Level-0 x of each kept cell's top-left corner."""
        return np.round(self.cols * self.cell_size).astype(np.int64)

    @property
    def y(self) -> np.ndarray:
        """Level-0 y of each kept cell's top-left corner."""
        return np.round(self.rows * self.cell_size).astype(np.int64)

    def counts(self) -> dict[str, int]:
        return {"cells": len(self), "tumor": int((self.labels == PatchLabel.TUMOR).sum()),
                "normal": int((self.labels == PatchLabel.NORMAL).sum()),
                "nolabel": int((self.labels == PatchLabel.NOLABEL).sum())}

    def label_grid(self, background: int = LABEL_BACKGROUND) -> np.ndarray:
        """``(rows, cols)`` int array of labels, ``background`` (:data:`~monai_wsi_ext.labels.LABEL_BACKGROUND`)
        where no cell was kept."""
        grid = np.full(self.shape, background, np.int64)
        grid[self.rows, self.cols] = self.labels
        return grid


def make_grid(slide_id: str, slide_size: tuple[int, int], tissue_mask: np.ndarray, mask_downsample: float,
              patch_size: int = 256, level: int = 0, level_downsample: float = 1.0,
              tissue_threshold: float = 0.8) -> PatchGrid:
    """Lay non-overlapping cells over the slide and keep those with enough tissue.

    Args:
        slide_id: identifier stored with the grid.
        slide_size: level-0 ``(width, height)``.
        tissue_mask: bool tissue mask.
        mask_downsample: level-0 pixels per mask pixel.
        patch_size: patch side at ``level``.
        level: read level of the patches.
        level_downsample: downsample of ``level`` relative to level 0.
        tissue_threshold: minimum tissue fraction of a kept cell.
    """
    if patch_size <= 0:
        raise ValueError(f"`patch_size` must be positive, got {patch_size}.")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"`tissue_threshold` must be in [0, 1], got {tissue_threshold}.")
    cell = float(patch_size) * float(level_downsample)
    width, height = slide_size
    n_rows, n_cols = int(height // cell), int(width // cell)
    frac = cell_fractions(tissue_mask, mask_downsample, n_rows, n_cols, cell)
    keep = frac >= tissue_threshold if tissue_threshold > 0 else np.ones_like(frac, bool)
    rr, cc = np.nonzero(keep)
    return PatchGrid(slide_id=str(slide_id), level=int(level), patch_size=int(patch_size), cell_size=cell,
                     shape=(n_rows, n_cols), rows=rr.astype(np.int64), cols=cc.astype(np.int64),
                     tissue=frac[rr, cc].astype(np.float32))


def label_cells(grid: PatchGrid, label_mask: np.ndarray, label_downsample: float,
                tissue_mask: np.ndarray | None = None, tissue_downsample: float | None = None,
                exhaustive: bool = False, tumor_threshold: float = 0.2, normal_threshold: float = 0.8) -> PatchGrid:
    """Fill ``grid.tumor``, ``grid.normal`` and ``grid.labels`` from a rasterised annotation.

    Args:
        grid: the grid to label (modified in place and returned).
        label_mask: ``(h, w)`` uint8, 0 unannotated, 1 normal, 2 tumor (``monai_wsi_ext.labels.MASK_*``).
        label_downsample: level-0 pixels per label-mask pixel.
        tissue_mask: the tissue mask, needed when ``exhaustive`` is set.
        tissue_downsample: its downsample.
        exhaustive: the slide's tumor is fully annotated, so unannotated tissue counts as normal
            (true for Camelyon16; false for partially annotated biopsies).
        tumor_threshold: minimum tumor fraction of a tumor cell.
        normal_threshold: minimum normal fraction of a normal cell.
    """
    rows, cols = grid.shape
    tumor_full = cell_fractions(label_mask == MASK_TUMOR, label_downsample, rows, cols, grid.cell_size)
    if exhaustive:
        if tissue_mask is None or tissue_downsample is None:
            raise ValueError("`exhaustive=True` needs `tissue_mask` and `tissue_downsample`.")
        # normal = annotated normal, or tissue that is not annotated tumor
        unannotated_tissue = _resample(tissue_mask, tissue_downsample, label_mask.shape, label_downsample)
        normal_mask = (label_mask == MASK_NORMAL) | (unannotated_tissue & (label_mask != MASK_TUMOR))
    else:
        normal_mask = label_mask == MASK_NORMAL
    normal_full = cell_fractions(normal_mask, label_downsample, rows, cols, grid.cell_size)
    grid.tumor = tumor_full[grid.rows, grid.cols].astype(np.float32)
    grid.normal = normal_full[grid.rows, grid.cols].astype(np.float32)
    labels = np.full(len(grid), PatchLabel.NOLABEL, np.int64)
    labels[grid.normal >= normal_threshold] = PatchLabel.NORMAL
    labels[grid.tumor >= tumor_threshold] = PatchLabel.TUMOR
    grid.labels = labels
    return grid


def _resample(mask: np.ndarray, downsample: float, shape: tuple[int, int], target_downsample: float) -> np.ndarray:
    """Nearest-neighbour resample of a mask to another scale (pixel centres)."""
    ys = np.clip(((np.arange(shape[0]) + 0.5) * target_downsample / downsample).astype(np.int64), 0,
                 mask.shape[0] - 1)
    xs = np.clip(((np.arange(shape[1]) + 0.5) * target_downsample / downsample).astype(np.int64), 0,
                 mask.shape[1] - 1)
    return np.asarray(mask, bool)[np.ix_(ys, xs)]


def write_patch_table(path: str | os.PathLike, grid: PatchGrid) -> Path:
    """Write the grid as a CSV patch table (see ``PATCH_TABLE_COLUMNS``), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PATCH_TABLE_COLUMNS)
        xs, ys = grid.x, grid.y
        for i in range(len(grid)):
            w.writerow([grid.slide_id, int(grid.rows[i]), int(grid.cols[i]), int(xs[i]), int(ys[i]), grid.level,
                        grid.patch_size, f"{grid.tissue[i]:.4f}", f"{grid.tumor[i]:.4f}", f"{grid.normal[i]:.4f}",
                        int(grid.labels[i])])
    return Path(path)


def read_patch_table(path: str | os.PathLike, shape: tuple[int, int] | None = None,
                     cell_size: float | None = None) -> PatchGrid:
    """Read a patch table back into a :class:`PatchGrid`.

    ``shape`` and ``cell_size`` come from the slide's ``meta.json``; without them they are inferred from the
    table (the bounding box of the kept cells and the x spacing).
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return PatchGrid(slide_id=Path(path).parent.name, level=0, patch_size=0, cell_size=cell_size or 0.0,
                         shape=tuple(shape or (0, 0)), rows=np.zeros(0, np.int64), cols=np.zeros(0, np.int64),
                         tissue=np.zeros(0, np.float32))
    r = np.array([int(d["row"]) for d in rows], np.int64)
    c = np.array([int(d["col"]) for d in rows], np.int64)
    level, patch = int(rows[0]["level"]), int(rows[0]["patch_size"])
    if cell_size is None:
        cell_size = float(int(rows[0]["x"]) / c[0]) if c[0] > 0 else float(patch)
    return PatchGrid(
        slide_id=str(rows[0]["slide_id"]), level=level, patch_size=patch, cell_size=float(cell_size),
        shape=tuple(shape) if shape is not None else (int(r.max()) + 1, int(c.max()) + 1), rows=r, cols=c,
        tissue=np.array([float(d["tissue"]) for d in rows], np.float32),
        tumor=np.array([float(d["tumor"]) for d in rows], np.float32),
        normal=np.array([float(d["normal"]) for d in rows], np.float32),
        labels=np.array([int(d["label"]) for d in rows], np.int64))
