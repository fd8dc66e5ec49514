"""Post-processing of the whole-slide probability mask: tissue masking, threshold, small objects and holes.

:class:`TileSegPostprocess` (settings from ``infer_tile_seg.json``) turns the blended tumor probability at the
target resolution into

* the **tumor mask**: ``p > threshold`` on tissue, connected tumor regions smaller than ``min_object_um2`` removed
  (8-connectivity), then holes (non-tumor areas enclosed by tumor, 4-connectivity, not touching the image border)
  up to ``max_hole_um2`` filled (``null``: every hole; 0: none);
* the **post-processed probability**, consistent with the mask: NaN off tissue (the writers' "no tissue": clear in
  the overlay, 0 in the TIFF), strictly above ``threshold`` inside the mask (a filled hole is raised just above it)
  and strictly below it outside (a removed object is lowered just below it), else unchanged. Every writer and
  every metric (whether it tests ``p > t`` or ``p >= t``) then sees the same tumor regions.

Pixels no tile reached (no tissue there) count as probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from monai_wsi_ext.errors import ConfigError

__all__ = ["PostprocessResult", "TileSegPostprocess", "remove_small_objects", "fill_small_holes"]

_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def _area_px(um2: float | None, pixel_um: float) -> float | None:
    return None if um2 is None else float(um2) / float(pixel_um) ** 2


def remove_small_objects(mask: np.ndarray, min_px: float) -> tuple[np.ndarray, int]:
    """``mask`` without its 8-connected components of fewer than ``min_px`` pixels, and how many were removed."""
    mask = np.asarray(mask, bool)
    if min_px <= 1 or not mask.any():
        return mask.copy(), 0
    labels, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    return mask & ~small[labels], int(small.sum())


def fill_small_holes(mask: np.ndarray, max_px: float | None) -> tuple[np.ndarray, int]:
    """``mask`` with its holes (4-connected non-mask components not touching the border) of at most ``max_px``
    pixels filled (``None``: every hole), and how many were filled."""
    mask = np.asarray(mask, bool)
    if (max_px is not None and max_px < 1) or not mask.any():
        return mask.copy(), 0
    labels, n = ndimage.label(~mask, structure=_FOUR)
    if n == 0:
        return mask.copy(), 0
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    hole = np.ones(n + 1, bool)
    hole[0] = False
    hole[border] = False
    if max_px is not None:
        hole &= sizes <= max_px
    return mask | hole[labels], int(hole.sum())


@dataclass
class PostprocessResult:
    """What :class:`TileSegPostprocess` made of one slide's probability mask.

    Attributes:
        prob: ``(H, W)`` float32 post-processed probability (NaN off tissue).
        mask: ``(H, W)`` bool tumor mask.
        tissue: ``(H, W)`` bool tissue the mask was restricted to (all True without tissue masking).
        removed_objects: tumor regions removed as too small.
        filled_holes: holes filled.
        threshold: the threshold used.
    """

    prob: np.ndarray
    mask: np.ndarray
    tissue: np.ndarray
    removed_objects: int = 0
    filled_holes: int = 0
    threshold: float = 0.5

    def summary(self) -> dict:
        """Numbers for the run record."""
        return {"threshold": self.threshold, "tumor_pixels": int(self.mask.sum()),
                "tissue_pixels": int(self.tissue.sum()), "removed_objects": self.removed_objects,
                "filled_holes": self.filled_holes}


class TileSegPostprocess:
    """Tissue masking, threshold, small-object removal and hole filling of a tumor probability mask.

    Args:
        threshold: tumor where the probability is above it.
        tissue_masking: restrict the mask (and the written probability) to tissue.
        min_object_um2: remove tumor regions smaller than this area (µm², 0: keep all).
        max_hole_um2: fill holes up to this area (µm²; None: every hole; 0: none).

    Raises:
        ConfigError: a setting out of range.
    """

    def __init__(self, threshold: float = 0.5, tissue_masking: bool = True, min_object_um2: float = 0.0,
                 max_hole_um2: float | None = 0.0):
        if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) < 1.0):
            raise ConfigError(f"`threshold` must be in (0, 1), got {threshold!r}.")
        for name, value in (("min_object_um2", min_object_um2), ("max_hole_um2", max_hole_um2)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{name}` must be a non-negative area in µm², got {value!r}.")
        if min_object_um2 is None:
            raise ConfigError("`min_object_um2` must be a number (0: keep every region).")
        self.threshold, self.tissue_masking = float(threshold), bool(tissue_masking)
        self.min_object_um2, self.max_hole_um2 = float(min_object_um2), max_hole_um2

    def __call__(self, prob: np.ndarray, tissue: np.ndarray | None, pixel_um: float) -> PostprocessResult:
        """Post-process one slide.

        Args:
            prob: ``(H, W)`` tumor probability at the target resolution (NaN where not inferred).
            tissue: ``(H, W)`` bool tissue at the same pixels (None: everything is tissue).
            pixel_um: µm per pixel (the target mpp), for the areas.
        """
        p = np.nan_to_num(np.asarray(prob, np.float32), nan=0.0)
        tissue = np.ones(p.shape, bool) if tissue is None or not self.tissue_masking else np.asarray(tissue, bool)
        if tissue.shape != p.shape:
            raise ValueError(f"tissue mask {tissue.shape} and probability mask {p.shape} differ.")
        mask = (p > self.threshold) & tissue
        mask, removed = remove_small_objects(mask, _area_px(self.min_object_um2, pixel_um))
        mask, filled = fill_small_holes(mask, _area_px(self.max_hole_um2, pixel_um))
        mask &= tissue
        thr = np.float32(self.threshold)
        above, below = np.nextafter(thr, np.float32(1)), np.nextafter(thr, np.float32(0))
        out = np.where(mask, np.maximum(p, above), np.minimum(p, below)).astype(np.float32)
        out[~tissue] = np.nan
        return PostprocessResult(out, mask, tissue, removed, filled, self.threshold)
