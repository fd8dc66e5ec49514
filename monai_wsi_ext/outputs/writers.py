"""Heatmap outputs a pathologist, QuPath or ASAP user looks at, plus a run record that traces them to code and model.

Every writer takes the tumor probability map at grid resolution: ``prob`` is a float ``(H, W)`` array with values in
``[0, 1]`` and ``NaN`` where the grid cell holds no tissue. Grid cell ``(r, c)`` covers level-0 pixels
``x in [c * cell_size, (c + 1) * cell_size)`` and ``y in [r * cell_size, (r + 1) * cell_size)``.

Files written (all atomically, see :mod:`monai_wsi_ext.io.atomic`: a temporary file in the destination folder is
renamed onto the final name only after it was written completely, so an exception, a kill or a full disk never leaves
a half-written output under its name; on an error the temporary file is removed, and a full disk is an
:class:`~monai_wsi_ext.io.atomic.AtomicWriteError` reading ``No space left on device: could not write <path>``):

- ``{slide_id}_prob.npy``: the float32 grid, NaN kept (:func:`write_prob_npy`).
- ``{slide_id}_prob.png``: the grid colour-mapped, one pixel per cell, background transparent (:func:`write_prob_png`).
- ``{slide_id}_heatmap.tif``: a pyramidal tiled TIFF aligned with the slide for QuPath / ASAP / OpenSlide
  (:func:`write_heatmap_tiff`).
- ``{slide_id}_overlay.png``: the heatmap blended over a slide thumbnail (:func:`write_overlay_png`).
- ``{slide_id}_tumor.geojson``: connected tumor regions as QuPath annotations (:func:`tumor_regions`,
  :func:`write_regions_geojson`).
- ``{slide_id}_labels.npy``: the grid's labels, when given (:func:`write_slide_outputs`).
- ``{slide_id}_record.json``: slide score, region count, file names and the run record (:func:`write_run_record`).

:func:`write_slide_outputs` writes the record last and removes a previous one first: a slide folder with a heatmap
but no record is incomplete (the run stopped or failed while writing it); the evaluation skips and reports it, and a
rerun writes the slide again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.utils import file_sha256, json_default
from monai_wsi_ext.io.annotations import AnnotationLabel, AnnotationPolygon, write_qupath_geojson
from monai_wsi_ext.io.atomic import (
    atomic_open,
    atomic_path,
    remove_stale_temporaries,
    write_json_atomic,
    write_npy_atomic,
)

__all__ = [
    "COLORMAPS",
    "SCORE_METHODS",
    "HeatmapTiffInfo",
    "apply_colormap",
    "choose_heatmap_downsample",
    "write_prob_npy",
    "write_prob_png",
    "ITK_FORMATS",
    "write_prob_itk",
    "write_heatmap_tiff",
    "write_overlay_png",
    "tumor_regions",
    "write_regions_geojson",
    "slide_score",
    "slide_status",
    "run_record",
    "write_run_record",
    "write_slide_outputs",
]

logger = logging.getLogger(__name__)

# Colour maps as anchor tables (position in [0, 1], R, G, B in [0, 1]) interpolated linearly per channel.
# "jet" follows the classic piecewise-linear definition; "viridis" is a five-anchor approximation.
COLORMAPS: dict[str, np.ndarray] = {
    "jet": np.array([
        [0.0, 0.0, 0.0, 0.5], [0.125, 0.0, 0.0, 1.0], [0.375, 0.0, 1.0, 1.0],
        [0.625, 1.0, 1.0, 0.0], [0.875, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0],
    ]),
    "hot": np.array([[0.0, 0.0, 0.0, 0.0], [1 / 3, 1.0, 0.0, 0.0], [2 / 3, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]),
    "gray": np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]),
    "viridis": np.array([
        [0.0, 0x44 / 255, 0x01 / 255, 0x54 / 255], [0.25, 0x3B / 255, 0x52 / 255, 0x8B / 255],
        [0.5, 0x21 / 255, 0x91 / 255, 0x8C / 255], [0.75, 0x5E / 255, 0xC9 / 255, 0x62 / 255],
        [1.0, 0xFD / 255, 0xE7 / 255, 0x25 / 255],
    ]),
}

SCORE_METHODS = ("smoothed_max", "max", "top_k_mean")

# Packages whose versions go into the run record (distribution names); missing ones are recorded as None.
_RECORD_PACKAGES = (
    "monai-wsi-canvas", "monai", "torch", "torchvision", "pytorch-ignite", "numpy", "scikit-image", "scikit-learn",
    "tifffile", "imagecodecs", "pillow", "cucim", "openslide-python", "openslide-bin", "tiffslide",
)

_PROB_TOLERANCE = 1e-3  # values this far outside [0, 1] (float round-off) are clipped, larger ones are an error


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _check_prob(prob: Any, name: str = "prob") -> np.ndarray:
    """Return ``prob`` as a float32 ``(H, W)`` array with values in [0, 1] or NaN; raise ValueError otherwise."""
    arr = np.asarray(prob, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D (H, W) probability grid, got shape {arr.shape}.")
    finite = arr[~np.isnan(arr)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if not np.isfinite([lo, hi]).all() or lo < -_PROB_TOLERANCE or hi > 1 + _PROB_TOLERANCE:
            raise ValueError(f"`{name}` must hold probabilities in [0, 1] (NaN for no tissue), got values in "
                             f"[{lo}, {hi}]; apply a sigmoid/softmax before writing.")
        if lo < 0 or hi > 1:
            arr = np.where(np.isnan(arr), arr, np.clip(arr, 0.0, 1.0)).astype(np.float32)
    return arr


def _check_cell_size(cell_size: float) -> float:
    if not (isinstance(cell_size, (int, float, np.integer, np.floating)) and cell_size > 0):
        raise ValueError(f"`cell_size` must be a positive number of level-0 pixels per grid cell, got {cell_size!r}.")
    return float(cell_size)


def _check_slide_size(slide_size: Sequence[int], grid_shape: tuple[int, int], cell_size: float) -> tuple[int, int]:
    if len(slide_size) != 2 or min(int(s) for s in slide_size) <= 0:
        raise ValueError(f"`slide_size` must be the slide's level-0 (width, height), got {slide_size!r}.")
    width, height = int(slide_size[0]), int(slide_size[1])
    grid_w, grid_h = grid_shape[1] * cell_size, grid_shape[0] * cell_size
    if abs(grid_w - width) >= cell_size or abs(grid_h - height) >= cell_size:
        logger.warning("The probability grid %s x cell_size %g covers %g x %g level-0 pixels but the slide is %d x %d; "
                       "check that `cell_size` and `slide_size` belong to this grid.", grid_shape, cell_size,
                       grid_w, grid_h, width, height)
    return width, height


def _cell_index(n_pixels: int, pixel_size: float, cell_size: float, n_cells: int) -> np.ndarray:
    """Grid cell index under the centre of each of ``n_pixels`` pixels of ``pixel_size`` level-0 pixels; -1 outside."""
    idx = np.floor((np.arange(n_pixels, dtype=np.float64) + 0.5) * pixel_size / cell_size).astype(np.int64)
    idx[(idx < 0) | (idx >= n_cells)] = -1
    return idx


def _to_uint8(prob: np.ndarray) -> np.ndarray:
    """``round(255 * p)`` as uint8, 0 where ``p`` is NaN."""
    return np.rint(np.nan_to_num(prob.astype(np.float64), nan=0.0) * 255.0).astype(np.uint8)


def apply_colormap(values: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB with one of :data:`COLORMAPS` (NaN maps to the colour of 0).

    Args:
        values: array of any shape with values in [0, 1].
        colormap: a key of :data:`COLORMAPS` (``jet``, ``hot``, ``gray``, ``viridis``).

    Returns:
        uint8 array of shape ``values.shape + (3,)``.

    Raises:
        ValueError: unknown ``colormap``.
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"`colormap` must be one of {sorted(COLORMAPS)}, got {colormap!r}.")
    table = COLORMAPS[colormap]
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(v, table[:, 0], table[:, 1 + ch]) for ch in range(3)], axis=-1)
    return np.rint(rgb * 255.0).astype(np.uint8)


def _save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    from PIL import Image

    with atomic_open(path) as f:
        # zlib level 1: a 2048 px slide overlay encodes in half the time of PIL's default 6, at about the same size
        # (measured on a synthetic H&E thumbnail: 0.16 s / 2.97 MB vs 0.33 s / 3.06 MB)
        Image.fromarray(image).save(f, format="PNG", compress_level=1)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# grid-resolution outputs
# ----------------------------------------------------------------------------------------------------------------
def write_prob_npy(path: str | os.PathLike, prob: np.ndarray) -> Path:
    """Write the probability grid as a float32 ``.npy`` (NaN kept for cells without tissue).

    Args:
        path: destination ``.npy`` file.
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.

    Returns:
        The path written.
    """
    return write_npy_atomic(path, _check_prob(prob))


ITK_FORMATS = ("nrrd", "mha")
"""File formats of :func:`write_prob_itk` (the file extension); both keep NaN (NIfTI through ITK does not, so it is
not offered)."""


def write_prob_itk(path: str | os.PathLike, prob: np.ndarray, cell_size: float, mpp: float | None = None) -> Path:
    """Write the probability grid as a 2-D float32 ITK image with its physical geometry, for ITK-based tools
    (3D Slicer, ITK-SNAP, MONAI Label, SimpleITK pipelines) that read spacing and origin rather than a pixel grid.

    One pixel per grid cell; spacing is the cell size in millimetres (``cell_size * mpp / 1000``) or, without an
    mpp, in level-0 pixels; the origin is the centre of cell ``(0, 0)``, so a pixel's physical position is the
    centre of its cell on the slide. Cells without tissue stay NaN. Needs the ``itk`` extra
    (``pip install -e ".[itk]"``).

    Args:
        path: destination ending in ``.nrrd`` or ``.mha`` (:data:`ITK_FORMATS`).
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        cell_size: grid cell size in level-0 pixels.
        mpp: level-0 microns per pixel, or None.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown extension, bad ``prob`` or ``cell_size``.
        ConfigError: ``itk`` is not installed.
    """
    path = Path(path)
    fmt = next((f for f in ITK_FORMATS if path.name.lower().endswith("." + f)), None)
    if fmt is None:
        raise ValueError(f"{path}: the ITK heatmap must end in one of {['.' + f for f in ITK_FORMATS]}.")
    arr = _check_prob(prob)
    cell = _check_cell_size(cell_size)
    try:
        import itk
    except ImportError:
        from monai_wsi_ext.errors import ConfigError

        raise ConfigError("writing ITK heatmaps needs the `itk` extra: pip install -e \".[itk]\"") from None
    spacing = cell * float(mpp) / 1000.0 if mpp else cell
    image = itk.image_from_array(np.ascontiguousarray(arr, dtype=np.float32))
    image.SetSpacing([spacing, spacing])
    image.SetOrigin([spacing / 2.0, spacing / 2.0])
    with atomic_path(path, suffix="." + fmt) as tmp:  # ITK picks the format from the extension
        itk.imwrite(image, str(tmp))
    return path


def write_prob_png(
    path: str | os.PathLike, prob: np.ndarray, colormap: str = "jet", background: str = "transparent", scale: int = 1
) -> Path:
    """Write the probability grid as a colour-mapped PNG, one pixel per grid cell (times ``scale``).

    Args:
        path: destination ``.png``.
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        colormap: a key of :data:`COLORMAPS`.
        background: ``"transparent"`` (RGBA, alpha 0 where there is no tissue) or ``"white"`` (RGB).
        scale: integer nearest-neighbour magnification of each cell.

    Returns:
        The path written.

    Raises:
        ValueError: bad ``prob``, ``colormap``, ``background`` or ``scale``.
    """
    arr = _check_prob(prob)
    if background not in ("transparent", "white"):
        raise ValueError(f"`background` must be 'transparent' or 'white', got {background!r}.")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"`scale` must be a positive integer, got {scale!r}.")
    tissue = ~np.isnan(arr)
    rgb = apply_colormap(arr, colormap)
    if background == "white":
        image = np.where(tissue[..., None], rgb, np.uint8(255))
    else:
        image = np.concatenate([rgb, (tissue * np.uint8(255))[..., None].astype(np.uint8)], axis=-1)
    if scale > 1:
        image = np.repeat(np.repeat(image, int(scale), axis=0), int(scale), axis=1)
    return _save_png(path, np.ascontiguousarray(image))


# ----------------------------------------------------------------------------------------------------------------
# pyramidal heatmap TIFF
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeatmapTiffInfo:
    """What :func:`write_heatmap_tiff` wrote.

    Attributes:
        path: the TIFF.
        downsample: level-0 slide pixels per heatmap base-level pixel (``d``).
        level_sizes: ``(width, height)`` of each pyramid level, base first.
        level_downsamples: downsample of each level relative to the slide's level 0 (``d * 2**k``).
        description: the JSON written to the base page's ImageDescription.
    """

    path: Path
    downsample: int
    level_sizes: list[tuple[int, int]] = field(default_factory=list)
    level_downsamples: list[int] = field(default_factory=list)
    description: dict = field(default_factory=dict)


def choose_heatmap_downsample(cell_size: float, pixels_per_cell: int = 4) -> int:
    """Base-level downsample of the heatmap TIFF: the largest power of two ``<= cell_size / pixels_per_cell``.

    Each grid cell then spans at least ``pixels_per_cell`` base pixels (so viewers that interpolate still show crisp
    blocks) while the base stays ``slide / d``: e.g. 256-pixel cells give ``d = 64`` and a 100k x 200k slide a
    1563 x 3125 base. Powers of two keep the heatmap's levels on the same downsamples as most slide pyramids.

    Args:
        cell_size: grid cell size in level-0 pixels.
        pixels_per_cell: minimum number of base pixels per cell side.

    Returns:
        The downsample ``d >= 1``.
    """
    cell_size = _check_cell_size(cell_size)
    if pixels_per_cell < 1:
        raise ValueError(f"`pixels_per_cell` must be >= 1, got {pixels_per_cell!r}.")
    return 2 ** max(0, int(math.floor(math.log2(max(cell_size / pixels_per_cell, 1.0)))))


def _paint_tile(grid8: np.ndarray, rows: np.ndarray, cols: np.ndarray, tile: int) -> np.ndarray:
    """One full ``tile x tile`` uint8 tile: ``grid8`` (with a trailing zero row/col for index -1) sampled at
    ``rows x cols``, zero-padded at the image's right/bottom edge."""
    out = np.zeros((tile, tile), dtype=np.uint8)
    out[: len(rows), : len(cols)] = grid8[np.ix_(rows, cols)]
    return out


def _level_tiles(grid8: np.ndarray, rows: np.ndarray, cols: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    for y0 in range(0, len(rows), tile):
        for x0 in range(0, len(cols), tile):
            yield _paint_tile(grid8, rows[y0:y0 + tile], cols[x0:x0 + tile], tile)


def write_heatmap_tiff(
    path: str | os.PathLike,
    prob: np.ndarray,
    cell_size: float,
    slide_size: Sequence[int],
    mpp: float | None = None,
    tile: int = 256,
    min_size: int = 256,
    downsample: int | None = None,
) -> HeatmapTiffInfo:
    """Write a pyramidal tiled TIFF heatmap aligned with the slide, for overlay in ASAP / QuPath / OpenSlide.

    Layout: the base level has downsample ``d`` (:func:`choose_heatmap_downsample` unless given) and is
    ``ceil(W / d) x ceil(H / d)`` pixels for a ``W x H`` slide, so ``size * d`` is within ``d`` of the slide size;
    each further level halves it (downsample ``d * 2**k``) until both sides are ``<= min_size``. Every level is its
    own top-level page (subfiletype 0, then 1 for reduced levels, which is what OpenSlide and cuCIM read as a
    pyramid), tiled ``tile x tile``, zlib/deflate compressed with a horizontal predictor (lossless). Pixels are one
    uint8 channel, ``round(255 * p)`` of the cell under the pixel's centre, and ``0`` for no tissue and outside the
    grid (so a tissue cell with ``p < 1/510`` also reads 0; the ``.npy`` keeps the exact values). With ``mpp`` the
    resolution tags hold ``1e4 / (mpp * d * 2**k)`` pixels per centimetre. The base page's ImageDescription is JSON
    with ``downsample``, ``cell_size``, ``slide_size``, ``mpp`` and the encoding, so users can align the heatmap.

    Tiles are painted straight from the small grid level by level; no slide-size array is ever built.

    Args:
        path: destination ``.tif``.
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        cell_size: grid cell size in level-0 pixels.
        slide_size: slide level-0 ``(width, height)``.
        mpp: slide level-0 microns per pixel, or None when unknown (no resolution tags then).
        tile: TIFF tile size (multiple of 16).
        min_size: stop adding levels once both sides are ``<= min_size``.
        downsample: base-level downsample override (a power of two).

    Returns:
        A :class:`HeatmapTiffInfo` with the downsample and level sizes.

    Raises:
        ValueError: bad ``prob``, ``cell_size``, ``slide_size``, ``tile``, ``mpp`` or ``downsample``.
    """
    import tifffile

    arr = _check_prob(prob)
    cell = _check_cell_size(cell_size)
    width, height = _check_slide_size(slide_size, arr.shape, cell)
    if tile < 16 or tile % 16:
        raise ValueError(f"`tile` must be a positive multiple of 16 (TIFF requirement), got {tile!r}.")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"`mpp` must be a positive number of microns per pixel or None, got {mpp!r}.")
    if downsample is None:
        d = choose_heatmap_downsample(cell)
    else:
        d = int(downsample)
        if d != downsample or d < 1 or d & (d - 1):
            raise ValueError(f"`downsample` must be a power of two >= 1, got {downsample!r}.")

    level_sizes: list[tuple[int, int]] = []
    level_downsamples: list[int] = []
    ds = d
    while True:
        w, h = max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))
        level_sizes.append((w, h))
        level_downsamples.append(ds)
        if max(w, h) <= max(min_size, 1):
            break
        ds *= 2

    # trailing zero row and column: index -1 (outside the grid) reads background
    grid8 = np.pad(_to_uint8(arr), ((0, 1), (0, 1)))
    description = {
        "software": "monai_wsi_ext.outputs.writers.write_heatmap_tiff",
        "content": "tumor probability heatmap",
        "encoding": "uint8 = round(255 * probability); 0 = no tissue / outside the grid",
        "downsample": d,
        "level_downsamples": level_downsamples,
        "cell_size": cell,
        "slide_size": [width, height],
        "mpp": None if mpp is None else float(mpp),
    }
    bigtiff = sum(w * h for w, h in level_sizes) > 2**31
    with atomic_open(path) as f:
        with tifffile.TiffWriter(f, bigtiff=bigtiff) as tif:
            for level, ((w, h), ds) in enumerate(zip(level_sizes, level_downsamples)):
                rows = _cell_index(h, ds, cell, arr.shape[0])
                cols = _cell_index(w, ds, cell, arr.shape[1])
                extra: dict[str, Any] = {}
                if mpp is not None:
                    extra = {"resolution": (1e4 / (mpp * ds),) * 2, "resolutionunit": "CENTIMETER"}
                tif.write(
                    _level_tiles(grid8, rows, cols, tile), shape=(h, w), dtype=np.uint8, tile=(tile, tile),
                    photometric="minisblack", compression="zlib", predictor="horizontal",
                    subfiletype=0 if level == 0 else 1, metadata=None,
                    description=json.dumps(description) if level == 0 else None, software=False, **extra,
                )
    logger.debug("Wrote heatmap %s: downsample %d, levels %s", path, d, level_sizes)
    return HeatmapTiffInfo(Path(path), d, level_sizes, level_downsamples, description)


# ----------------------------------------------------------------------------------------------------------------
# overlay on a thumbnail
# ----------------------------------------------------------------------------------------------------------------
def write_overlay_png(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumbnail_downsample: float | Sequence[float],
    prob: np.ndarray,
    cell_size: float,
    alpha: float = 0.4,
    threshold: float | None = None,
    colormap: str = "jet",
    outline_color: Sequence[int] = (0, 0, 0),
    outline_width: int = 2,
) -> Path:
    """Blend the colour-mapped heatmap over a slide thumbnail and write an RGB PNG of the thumbnail's size.

    The grid is sampled nearest-neighbour at each thumbnail pixel centre; pixels over a tissue cell become
    ``(1 - alpha) * thumbnail + alpha * colour``, all others keep the thumbnail. With ``threshold`` the regions with
    ``p >= threshold`` are also outlined (``outline_width`` thumbnail pixels inside the region's edge).

    Args:
        path: destination ``.png``.
        thumbnail: uint8 ``(h, w, 3)`` RGB (an alpha channel is dropped).
        thumbnail_downsample: level-0 pixels per thumbnail pixel, one number or ``(x, y)``.
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        cell_size: grid cell size in level-0 pixels.
        alpha: heatmap opacity in [0, 1].
        threshold: outline regions at or above this probability; None for no outline.
        colormap: a key of :data:`COLORMAPS`.
        outline_color: RGB of the outline.
        outline_width: outline thickness in thumbnail pixels.

    Returns:
        The path written.

    Raises:
        ValueError: bad thumbnail, downsample, ``alpha`` or ``prob``.
    """
    arr = _check_prob(prob)
    cell = _check_cell_size(cell_size)
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] not in (3, 4) or thumb.dtype != np.uint8 or 0 in thumb.shape[:2]:
        raise ValueError(f"`thumbnail` must be a uint8 (h, w, 3) RGB image, got {thumb.dtype} {thumb.shape}.")
    thumb = thumb[..., :3]
    ds = np.broadcast_to(np.asarray(thumbnail_downsample, dtype=np.float64), (2,))
    if not (np.isfinite(ds).all() and (ds > 0).all()):
        raise ValueError("`thumbnail_downsample` must be positive level-0 pixels per thumbnail pixel (one number or "
                         f"(x, y)), got {thumbnail_downsample!r}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")

    h, w = thumb.shape[:2]
    rows = _cell_index(h, float(ds[1]), cell, arr.shape[0])
    cols = _cell_index(w, float(ds[0]), cell, arr.shape[1])
    padded = np.pad(arr, ((0, 1), (0, 1)), constant_values=np.nan)  # index -1 -> NaN (no tissue)
    p = padded[np.ix_(rows, cols)]
    tissue = ~np.isnan(p)
    # colour-mapped once per grid cell and blended only at tissue pixels (the map and the blend are per element,
    # so this equals mapping and blending every pixel of a full-size image, at a fraction of its memory and time)
    ti, tj = np.nonzero(tissue)
    colour = apply_colormap(padded, colormap)[rows[ti], cols[tj]]
    out = thumb.copy()
    out[ti, tj] = np.rint((1.0 - alpha) * thumb[ti, tj].astype(np.float32)
                          + alpha * colour.astype(np.float32)).astype(np.uint8)
    if threshold is not None:
        from scipy.ndimage import binary_erosion

        region = tissue & (np.nan_to_num(p, nan=-1.0) >= threshold)
        if region.any():
            inner = binary_erosion(region, structure=np.ones((3, 3), bool), iterations=max(1, int(outline_width)),
                                   border_value=0)
            out[region & ~inner] = np.asarray(outline_color, dtype=np.uint8)
    return _save_png(path, out)


# ----------------------------------------------------------------------------------------------------------------
# tumor regions
# ----------------------------------------------------------------------------------------------------------------
def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on the straight line through their neighbours (ring given without closing point)."""
    prev, nxt = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    a, b = ring - prev, nxt - ring
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return ring[cross != 0]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def tumor_regions(
    prob: np.ndarray, cell_size: float, threshold: float = 0.5, min_cells: int = 1, mpp: float | None = None
) -> list[dict]:
    """Connected tumor regions of the grid as polygons in level-0 coordinates.

    Cells with ``p >= threshold`` (NaN never) are grouped by 8-connectivity. Each component is outlined with
    ``skimage.measure.find_contours`` on its padded mask upsampled x2 (diagonal neighbours kept together with
    ``fully_connected="high"``): edges follow the cell borders exactly and each convex corner is cut by a quarter
    cell, so every ring is simple even where cells touch only at a corner. Enclosed non-tumor areas (4-connected
    background, including no-tissue cells and other regions) become holes. Collinear vertices are dropped. The
    exterior ring has positive shoelace area in ``(x, y)``, holes negative.

    Args:
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        cell_size: grid cell size in level-0 pixels.
        threshold: minimum probability of a tumor cell.
        min_cells: drop regions with fewer cells.
        mpp: level-0 microns per pixel, for ``area_mm2``.

    Returns:
        One dict per region, largest first (ties in raster order), with ``id`` (1-based), ``name``, ``polygon``
        (:class:`~monai_wsi_ext.io.annotations.AnnotationPolygon`, label tumor), ``n_cells``, ``area_px``
        (``n_cells * cell_size**2`` level-0 px^2), ``area_mm2`` (None without ``mpp``), ``mean_probability``,
        ``max_probability``, ``bbox`` (level-0 ``[x0, y0, x1, y1]`` of the cells) and ``centroid`` (level-0
        ``[x, y]`` mean of the cell centres).
    """
    from scipy.ndimage import find_objects
    from skimage.measure import find_contours, label

    arr = _check_prob(prob)
    cell = _check_cell_size(cell_size)
    if min_cells < 1:
        raise ValueError(f"`min_cells` must be >= 1, got {min_cells!r}.")
    mask = np.nan_to_num(arr, nan=-1.0) >= threshold
    labels = label(mask, connectivity=2)
    found = []
    for lab, sl in enumerate(find_objects(labels), start=1):
        if sl is None:
            continue
        sub = labels[sl] == lab
        n_cells = int(sub.sum())
        if n_cells < min_cells:
            continue
        r0, c0 = sl[0].start, sl[1].start
        up = np.kron(np.pad(sub, 1).astype(np.float32), np.ones((2, 2), np.float32))
        rings = []
        for contour in find_contours(up, 0.5, fully_connected="high"):
            # contour units: upsampled pixel centres; (v + 0.5) / 2 - 1 is the grid coordinate of the cell border
            y = ((contour[:, 0] + 0.5) / 2.0 - 1.0 + r0) * cell
            x = ((contour[:, 1] + 0.5) / 2.0 - 1.0 + c0) * cell
            ring = np.stack([x, y], axis=1)
            if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
                ring = ring[:-1]
            ring = _drop_collinear(ring)
            if len(ring) >= 3:
                rings.append((ring, _signed_area(ring)))
        if not rings:  # cannot happen for a non-empty padded mask; guard anyway
            continue
        outer = max(range(len(rings)), key=lambda i: abs(rings[i][1]))
        exterior = rings[outer][0] if rings[outer][1] > 0 else rings[outer][0][::-1]
        holes = [r if a < 0 else r[::-1] for i, (r, a) in enumerate(rings) if i != outer]
        values = arr[sl][sub]
        rr, cc = np.nonzero(sub)
        found.append({
            "exterior": exterior, "holes": holes, "n_cells": n_cells,
            "mean_probability": float(values.mean()), "max_probability": float(values.max()),
            "bbox": [float((c0 + cc.min()) * cell), float((r0 + rr.min()) * cell),
                     float((c0 + cc.max() + 1) * cell), float((r0 + rr.max() + 1) * cell)],
            "centroid": [float((c0 + cc.mean() + 0.5) * cell), float((r0 + rr.mean() + 0.5) * cell)],
        })
    found.sort(key=lambda reg: -reg["n_cells"])  # stable: ties stay in raster order
    regions = []
    for i, reg in enumerate(found, start=1):
        name = f"Tumor region {i}"
        area_px = reg["n_cells"] * cell * cell
        regions.append({
            "id": i,
            "name": name,
            "polygon": AnnotationPolygon(reg.pop("exterior"), reg.pop("holes"), AnnotationLabel.TUMOR, name, "Tumor"),
            "n_cells": reg["n_cells"],
            "area_px": area_px,
            "area_mm2": None if mpp is None else area_px * float(mpp) ** 2 / 1e6,
            **{k: reg[k] for k in ("mean_probability", "max_probability", "bbox", "centroid")},
        })
    return regions


_MEASUREMENT_KEYS = ("n_cells", "area_px", "area_mm2", "mean_probability", "max_probability")


def write_regions_geojson(path: str | os.PathLike, regions: list[dict], object_type: str = "annotation") -> Path:
    """Write :func:`tumor_regions` output as a QuPath-compatible GeoJSON ``FeatureCollection``.

    Each feature is classified ``Tumor``; its properties carry ``name``, the numbers (``n_cells``, ``area_px``,
    ``area_mm2`` when known, ``mean_probability``, ``max_probability``) and the same numbers again in a
    ``measurements`` dict, which QuPath imports as the object's measurement list.

    Args:
        path: destination ``.geojson``.
        regions: dicts from :func:`tumor_regions`.
        object_type: QuPath ``objectType`` (``annotation`` or ``detection``).

    Returns:
        The path written.
    """
    polygons, properties = [], []
    for reg in regions:
        numbers = {k: reg[k] for k in _MEASUREMENT_KEYS if reg.get(k) is not None}
        polygons.append(reg["polygon"])
        properties.append({"name": reg.get("name", reg["polygon"].name), **numbers, "measurements": dict(numbers)})
    return write_qupath_geojson(path, polygons, object_type=object_type, properties=properties)


# ----------------------------------------------------------------------------------------------------------------
# slide score
# ----------------------------------------------------------------------------------------------------------------
def _smoothed(prob: np.ndarray) -> np.ndarray:
    """NaN-aware 3x3 mean: each tissue cell becomes the mean of the tissue cells in its 3x3 neighbourhood."""
    valid = ~np.isnan(prob)
    values = np.pad(np.where(valid, prob, 0.0).astype(np.float64), 1)
    counts = np.pad(valid.astype(np.float64), 1)
    h, w = prob.shape
    total = sum(values[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    n = sum(counts[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return np.where(valid, total / np.maximum(n, 1.0), np.nan)


def slide_score(prob: np.ndarray, method: str = "smoothed_max", k: int = 5) -> float | None:
    """One tumor score per slide from the probability grid.

    Methods:
        - ``smoothed_max`` (default): the maximum of the NaN-aware 3x3 mean of the tissue cells. A lone spurious
          cell inside tissue is diluted by its neighbours while a tumor of a few cells keeps a high score; a
          tissue cell without tissue neighbours is its own mean.
        - ``max``: the maximum cell probability (most sensitive, least robust).
        - ``top_k_mean``: the mean of the ``k`` highest cell probabilities (all cells if fewer).

    A grid without tissue has no score: None (logged as a warning), not a confident 0.0 (see :func:`slide_status`).

    Args:
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        method: one of :data:`SCORE_METHODS`.
        k: number of cells for ``top_k_mean``.

    Returns:
        The score in [0, 1], or None when the grid has no tissue cell.

    Raises:
        ValueError: unknown ``method`` or ``k < 1``.
    """
    arr = _check_prob(prob)
    if method not in SCORE_METHODS:
        raise ValueError(f"`method` must be one of {SCORE_METHODS}, got {method!r}.")
    if method == "top_k_mean" and (int(k) != k or k < 1):
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    values = arr[~np.isnan(arr)]
    if values.size == 0:
        logger.warning("slide_score: the probability grid has no tissue cell; no score (None, status no_tissue).")
        return None
    if method == "max":
        return float(values.max())
    if method == "top_k_mean":
        top = np.sort(values.astype(np.float64))[-int(k):]
        return float(top.mean())
    return float(np.nanmax(_smoothed(arr)))


def slide_status(prob: np.ndarray) -> str:
    """``no_tissue`` when the probability grid has no tissue cell (all NaN: nothing was scored), else ``ok``."""
    return "no_tissue" if not np.any(~np.isnan(_check_prob(prob))) else "ok"


# ----------------------------------------------------------------------------------------------------------------
# run record
# ----------------------------------------------------------------------------------------------------------------
def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _RECORD_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit() -> str | None:
    """Commit of the git checkout that holds this package, or None (no git, no commit, installed copy)."""
    pkg_dir = Path(__file__).resolve().parent
    if "site-packages" in pkg_dir.parts or "dist-packages" in pkg_dir.parts:
        return None
    try:
        result = subprocess.run(["git", "-C", str(pkg_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) >= 40 else None


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


def run_record(**extra: Any) -> dict:
    """Provenance of a run: timestamp, platform, package versions, git commit and command line.

    Args:
        extra: further entries merged into the record (they override the defaults).

    Returns:
        A JSON-serialisable dict with ``timestamp_utc`` (ISO 8601), ``python``, ``platform``, ``packages``
        (distribution -> version or None), ``git_commit`` (None outside a git checkout) and ``command``
        (``sys.argv``), plus ``extra``.
    """
    record = {
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _package_versions(),
        "git_commit": _git_commit(),
        "command": list(sys.argv),
    }
    record.update(extra)
    return record


def write_run_record(
    path: str | os.PathLike,
    config: dict | None = None,
    weights: dict[str, str | os.PathLike] | None = None,
    command: Sequence[str] | None = None,
    **extra: Any,
) -> dict:
    """Write a run record (:func:`run_record`) with the config, its hash and the weights' hashes as JSON.

    Args:
        path: destination ``.json``.
        config: the resolved configuration; stored as given and hashed as ``config_sha256`` (sha256 of its
            canonical JSON: sorted keys, no whitespace).
        weights: name -> weights file; each recorded as ``{"path", "sha256", "size_bytes"}`` (sha256 None and a
            warning when the file is missing).
        command: the command line to record instead of ``sys.argv``.
        extra: further entries merged into the record.

    Returns:
        The record written.
    """
    weight_info: dict[str, dict] = {}
    for name, wpath in (weights or {}).items():
        p = Path(wpath)
        if p.is_file():
            weight_info[name] = {"path": str(p.resolve()), "sha256": file_sha256(p), "size_bytes": p.stat().st_size}
        else:
            logger.warning("write_run_record: weights file %r for %r does not exist; recording no hash.", str(p), name)
            weight_info[name] = {"path": str(p), "sha256": None, "size_bytes": None}
    fields: dict[str, Any] = {
        "config": config,
        "config_sha256": None if config is None else hashlib.sha256(_canonical_json(config).encode()).hexdigest(),
        "weights": weight_info,
    }
    if command is not None:
        fields["command"] = [str(c) for c in command]
    record = run_record(**fields, **extra)
    # round-trip through JSON so numpy values and paths in `config` / `extra` become plain JSON values
    record = json.loads(json.dumps(record, default=json_default))
    write_json_atomic(path, record)
    return record


# ----------------------------------------------------------------------------------------------------------------
# everything for one slide
# ----------------------------------------------------------------------------------------------------------------
def write_slide_outputs(
    out_dir: str | os.PathLike,
    slide_id: str,
    prob: np.ndarray,
    cell_size: float,
    slide_size: Sequence[int],
    mpp: float | None,
    thumbnail: np.ndarray | None,
    thumbnail_downsample: float | Sequence[float] | None,
    threshold: float = 0.5,
    config: dict | None = None,
    weights: dict[str, str | os.PathLike] | None = None,
    score_method: str = "smoothed_max",
    itk_format: str | None = None,
    labels: np.ndarray | None = None,
    dicom_source: Any = None,
    dicom_seg: Sequence[str] = (),
    dicom_annotations: bool = False,
) -> dict:
    """Write every output of one slide under ``out_dir`` with consistent names.

    Files: ``{slide_id}_prob.npy``, ``{slide_id}_prob.png``, ``{slide_id}_heatmap.tif``, ``{slide_id}_overlay.png``
    (skipped when ``thumbnail`` is None), ``{slide_id}_tumor.geojson``, ``{slide_id}_labels.npy`` (when ``labels``
    is given) and, last, ``{slide_id}_record.json`` with the slide score, region summary, heatmap downsample, file
    names and the run record. A slide without any tissue cell gets ``"slide_score": null`` and
    ``"status": "no_tissue"`` (else ``"ok"``) in its record and in the returned dict.

    Complete or marked incomplete: each file is atomic (see :mod:`monai_wsi_ext.io.atomic`); the slide's previous
    record, the outputs of an earlier run that this call does not write (overlay, label grid, ITK image) and the
    temporary files an interrupted run left in ``out_dir`` are removed before anything else is written, and the
    record is written last. So a folder with a heatmap but no record is incomplete: a step failed
    (the files already written stay, no record is written) or the run was killed.

    Args:
        out_dir: output folder (created).
        slide_id: slide identifier used in the file names (converted to ``str``).
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue.
        cell_size: grid cell size in level-0 pixels.
        slide_size: slide level-0 ``(width, height)``.
        mpp: level-0 microns per pixel, or None.
        thumbnail: uint8 RGB thumbnail for the overlay, or None.
        thumbnail_downsample: level-0 pixels per thumbnail pixel (one number or ``(x, y)``).
        threshold: tumor threshold for regions and the overlay outline.
        config: configuration to record (and hash).
        weights: name -> weights file to hash into the record.
        score_method: :func:`slide_score` method.
        itk_format: also write ``{slide_id}_prob.<format>`` with :func:`write_prob_itk` (``nrrd`` or ``mha``);
            None skips it.
        labels: the grid's ``(H, W)`` integer labels (e.g. ``PatchGrid.label_grid()``: 1 tumor, 0 normal, -1
            nolabel, -2 background), written as ``{slide_id}_labels.npy`` for the evaluation; None skips it.
        dicom_source: the slide's DICOM WSI series (:class:`~monai_wsi_ext.io.dicom.WsiSeries`) for DICOM outputs;
            None (a slide that is not DICOM): no DICOM outputs, whatever ``dicom_seg`` asks.
        dicom_seg: DICOM Segmentations to write (``fractional``, ``binary``) as ``{slide_id}_seg_<type>.dcm``
            (:func:`monai_wsi_ext.outputs.dicom.write_dicom_seg`).
        dicom_annotations: also write the tumor regions as ``{slide_id}_tumor_ann.dcm`` (Microscopy Bulk Simple
            Annotations; not written when there is no region).

    Returns:
        ``{"prob_npy", "prob_png", "heatmap_tiff", "overlay_png", "tumor_geojson", "labels_npy", "record_json",
        "prob_itk", "dicom_seg_fractional", "dicom_seg_binary", "dicom_annotations"}`` -> Path (or None for an
        output not written), plus ``slide_score`` (None
        without tissue), ``status``, ``n_regions`` and ``heatmap_downsample``.

    Raises:
        ValueError: a bad ``slide_id``, a label grid of another shape, or any argument the individual writers reject.
        AtomicWriteError: a file could not be written (an ``OSError``; e.g. ``No space left on device: could not
            write <path>``); the slide has no record then.
    """
    slide_id = str(slide_id)
    if not slide_id or slide_id in (".", "..") or "/" in slide_id or os.sep in slide_id:
        raise ValueError(f"`slide_id` must be a plain file-name stem, got {slide_id!r}.")
    arr = _check_prob(prob)
    if itk_format is not None and itk_format not in ITK_FORMATS:
        raise ValueError(f"`itk_format` must be one of {ITK_FORMATS} or None, got {itk_format!r}.")
    label_grid = None if labels is None else np.asarray(labels)
    if label_grid is not None and (label_grid.shape != arr.shape or not np.issubdtype(label_grid.dtype, np.integer)):
        raise ValueError(f"`labels` must be an integer grid of the probability grid's shape {arr.shape}, got "
                         f"{label_grid.dtype} {label_grid.shape}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {
        "prob_npy": out / f"{slide_id}_prob.npy",
        "prob_png": out / f"{slide_id}_prob.png",
        "heatmap_tiff": out / f"{slide_id}_heatmap.tif",
        "overlay_png": out / f"{slide_id}_overlay.png",
        "tumor_geojson": out / f"{slide_id}_tumor.geojson",
        "labels_npy": out / f"{slide_id}_labels.npy" if label_grid is not None else None,
        "record_json": out / f"{slide_id}_record.json",
        "prob_itk": out / f"{slide_id}_prob.{itk_format}" if itk_format else None,
    }
    dicom_note = None
    if dicom_source is None and (dicom_seg or dicom_annotations):
        dicom_note, dicom_annotations = "not written: the slide is not DICOM", False
    dicom_seg = tuple(dicom_seg or ()) if dicom_source is not None else ()
    for kind in ("fractional", "binary"):
        paths[f"dicom_seg_{kind}"] = out / f"{slide_id}_seg_{kind}.dcm" if kind in dicom_seg else None
    paths["dicom_annotations"] = None  # set once there are regions to write
    # the folder is "incomplete" until the new record is written: no old record may vouch for a mix of files, and no
    # output of an earlier run that this one does not write (e.g. a label grid the evaluation would read) stays
    remove_stale_temporaries(out)
    paths["record_json"].unlink(missing_ok=True)
    not_written = [out / f"{slide_id}_overlay.png"] if thumbnail is None else []
    not_written += [out / f"{slide_id}_labels.npy"] if label_grid is None else []
    not_written += [out / f"{slide_id}_prob.{fmt}" for fmt in ITK_FORMATS if fmt != itk_format]
    not_written += [out / f"{slide_id}_seg_{k}.dcm" for k in ("fractional", "binary") if k not in dicom_seg]
    not_written += [out / f"{slide_id}_tumor_ann.dcm"]
    for old in not_written:
        old.unlink(missing_ok=True)
    write_prob_npy(paths["prob_npy"], arr)
    write_prob_png(paths["prob_png"], arr)
    if paths["prob_itk"] is not None:
        write_prob_itk(paths["prob_itk"], arr, cell_size, mpp=mpp)
    info = write_heatmap_tiff(paths["heatmap_tiff"], arr, cell_size, slide_size, mpp=mpp)
    if thumbnail is None:
        paths["overlay_png"] = None
    else:
        if thumbnail_downsample is None:
            raise ValueError("`thumbnail_downsample` (level-0 pixels per thumbnail pixel) is needed with a thumbnail, "
                             "got None.")
        write_overlay_png(paths["overlay_png"], thumbnail, thumbnail_downsample, arr, cell_size, threshold=threshold)
    regions = tumor_regions(arr, cell_size, threshold=threshold, mpp=mpp)
    write_regions_geojson(paths["tumor_geojson"], regions)
    if label_grid is not None:
        write_npy_atomic(paths["labels_npy"], label_grid)
    if dicom_source is not None and (dicom_seg or dicom_annotations):
        from monai_wsi_ext.outputs import dicom as dicom_out

        for kind in dicom_seg:
            dicom_out.write_dicom_seg(paths[f"dicom_seg_{kind}"], arr, cell_size, dicom_source, kind, threshold)
        if dicom_annotations and regions:
            paths["dicom_annotations"] = out / f"{slide_id}_tumor_ann.dcm"
            dicom_out.write_dicom_annotations(paths["dicom_annotations"], regions, dicom_source)
    score = slide_score(arr, method=score_method)
    status = slide_status(arr)
    write_run_record(
        paths["record_json"], config=config, weights=weights,
        slide_id=slide_id, slide_size=[int(s) for s in slide_size], mpp=mpp, cell_size=cell_size,
        grid_shape=list(arr.shape), threshold=threshold, slide_score=score, status=status, score_method=score_method,
        n_regions=len(regions), n_tissue_cells=int((~np.isnan(arr)).sum()),
        regions=[{k: r[k] for k in ("id", "n_cells", "area_px", "area_mm2", "mean_probability", "max_probability",
                                    "bbox")} for r in regions],
        heatmap_downsample=info.downsample, heatmap_level_sizes=[list(s) for s in info.level_sizes],
        outputs={k: (None if v is None else v.name) for k, v in paths.items()},
        **({"dicom_source": dicom_source.summary()} if hasattr(dicom_source, "summary") else {}),
        **({"dicom_outputs": dicom_note} if dicom_note else {}),
    )
    logger.info("Slide %s: score %s (%s), %d tumor region(s), outputs in %s", slide_id,
                "none (no tissue)" if score is None else f"{score:.4f}", score_method, len(regions), out)
    return {**paths, "slide_score": score, "status": status, "n_regions": len(regions),
            "heatmap_downsample": info.downsample}
