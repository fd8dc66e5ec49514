"""Slides and their masks at one target resolution in µm/px.

A slide of level-0 size ``W x H`` and level-0 mpp ``m`` seen at ``target_mpp`` has the downsample
``d = target_mpp / m`` (level-0 pixels per target pixel, the same for both axes, so nothing is stretched) and
``ceil(H / d) x ceil(W / d)`` target pixels (:class:`TargetGeometry`). Target pixel ``(r, c)`` covers level-0
``[c * d, (c + 1) * d) x [r * d, (r + 1) * d)``, the convention of
:func:`~monai_wsi_ext.io.annotations.rasterize_annotations`; the last row and column may reach past the slide.

:class:`SlideLabels` turns a slide's annotation (ASAP XML, QuPath GeoJSON, ImageScope XML, NCRF JSON through
:func:`~monai_wsi_ext.io.annotations.read_annotations`, or a label-mask image through
:func:`~monai_wsi_ext.io.annotations.read_label_mask`) into label masks (0 unannotated, 1 normal, 2 tumor) of any
window at any resolution: polygons are rasterised for the window alone (a training tile never needs the
whole-slide mask), label-mask images are sampled at the window's pixel centres. :func:`sample_mask` does the same
for tissue masks, :func:`tile_fractions` estimates the tissue or tumor fraction of many tiles at once and
:func:`tile_targets` gives the training targets (1 tumor, 0 not tumor, -1 ignored).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io import annotations as ann
from monai_wsi_ext.io.wsi import validate_mpp
from monai_wsi_ext.labels import IGNORE_INDEX, MASK_NORMAL, MASK_TUMOR

__all__ = [
    "LABEL_MASK_SUFFIXES",
    "TargetGeometry",
    "target_geometry",
    "sample_mask",
    "tile_fractions",
    "tile_targets",
    "SlideLabels",
]

logger = logging.getLogger(__name__)

#: file suffixes read as label-mask images (anything else is a polygon annotation file)
LABEL_MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass(frozen=True)
class TargetGeometry:
    """A slide's pixel grid at a target resolution.

    Attributes:
        slide_size: level-0 ``(width, height)``.
        mpp: level-0 µm/px of the slide.
        target_mpp: µm/px of the target grid.
    """

    slide_size: tuple[int, int]
    mpp: float
    target_mpp: float

    @property
    def downsample(self) -> float:
        """Level-0 pixels per target pixel (both axes)."""
        return float(self.target_mpp) / float(self.mpp)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the target grid: ``ceil(H / d), ceil(W / d)``."""
        d = self.downsample
        width, height = self.slide_size
        # the small tolerance keeps 1536 / (4.0 computed as 1.0 / 0.25) at 384, not 385
        return (max(1, math.ceil(height / d - 1e-9)), max(1, math.ceil(width / d - 1e-9)))

    @property
    def aspect_error(self) -> float:
        """Relative difference between the target grid's and the slide's aspect ratio (below one pixel's worth)."""
        rows, cols = self.shape
        width, height = self.slide_size
        return abs((cols / rows) / (width / height) - 1.0)


def target_geometry(slide_size: Sequence[int], mpp: float | None, target_mpp: float,
                    source: str | os.PathLike | None = None) -> TargetGeometry:
    """The :class:`TargetGeometry` of a slide.

    Args:
        slide_size: level-0 ``(width, height)``.
        mpp: the slide's level-0 µm/px (from the file, or given to the reader).
        target_mpp: µm/px of the target grid (e.g. 1.0; the article's tiles are at 0.5-2 µm/px).
        source: the slide, named in errors.

    Raises:
        ConfigError: ``target_mpp`` is not a positive number, or the slide has no mpp (give it to the reader:
            ``--prepare#mpp 0.243`` or ``SlideReader(mpp=...)``).
    """
    target = validate_mpp(target_mpp, "target_mpp")
    if target is None:
        raise ConfigError("`target_mpp` is required: the µm/px every slide is resampled to (e.g. 1.0).")
    if mpp is None:
        where = f"{source}: " if source is not None else ""
        raise ConfigError(f"{where}the slide has no mpp (no resolution metadata), so it cannot be resampled to "
                          f"{target} µm/px; state the scanner's level-0 mpp (e.g. `--prepare#mpp 0.243` for "
                          "Camelyon16, or `SlideReader(mpp=...)`).")
    mpp = validate_mpp(mpp, "mpp")
    width, height = (int(slide_size[0]), int(slide_size[1]))
    if width <= 0 or height <= 0:
        raise ConfigError(f"`slide_size` must be a positive level-0 (width, height), got {tuple(slide_size)!r}.")
    return TargetGeometry((width, height), float(mpp), float(target))


def sample_mask(mask: np.ndarray, mask_downsample: float, shape: Sequence[int], downsample: float,
                origin: Sequence[float] = (0, 0), fill=0) -> np.ndarray:
    """Nearest-neighbour resample of a mask onto a window of another pixel grid, at its pixel centres.

    Output pixel ``(r, c)`` takes the mask pixel under the level-0 point
    ``((origin_x + c + 0.5) * downsample, (origin_y + r + 0.5) * downsample)``; points outside the mask get ``fill``.

    Args:
        mask: ``(h, w)`` array whose pixel covers ``mask_downsample`` level-0 pixels.
        mask_downsample: level-0 pixels per mask pixel.
        shape: ``(rows, cols)`` of the window.
        downsample: level-0 pixels per window pixel.
        origin: ``(x, y)`` of the window's top-left pixel in window-grid pixels (may be negative).
        fill: value outside the mask.

    Returns:
        ``shape`` array of ``mask``'s dtype.
    """
    mask = np.asarray(mask)
    rows, cols = int(shape[0]), int(shape[1])
    ys = np.floor((float(origin[1]) + np.arange(rows) + 0.5) * float(downsample) / float(mask_downsample))
    xs = np.floor((float(origin[0]) + np.arange(cols) + 0.5) * float(downsample) / float(mask_downsample))
    ys, xs = ys.astype(np.int64), xs.astype(np.int64)
    vy, vx = (ys >= 0) & (ys < mask.shape[0]), (xs >= 0) & (xs < mask.shape[1])
    out = np.full((rows, cols), fill, dtype=mask.dtype)
    if vy.any() and vx.any():
        out[np.ix_(vy, vx)] = mask[np.ix_(ys[vy], xs[vx])]
    return out


def tile_fractions(mask: np.ndarray, mask_downsample: float, x0: np.ndarray, y0: np.ndarray, size: float,
                   samples: int = 8) -> np.ndarray:
    """Fraction of each of many square level-0 windows covered by ``mask``, on ``samples x samples`` points each.

    Points outside the mask count as not covered, so a tile reaching past the slide is not credited with tissue
    it does not have (the grid's :func:`~monai_wsi_ext.prep.grid.cell_fractions` needs cells inside the slide).

    Args:
        mask: ``(h, w)`` bool or 0/1 mask whose pixel covers ``mask_downsample`` level-0 pixels.
        mask_downsample: level-0 pixels per mask pixel.
        x0, y0: ``(N,)`` level-0 top-left corners of the windows.
        size: level-0 side of the windows.
        samples: points per side.

    Returns:
        ``(N,)`` float32 fractions in [0, 1].
    """
    x0, y0 = np.asarray(x0, np.float64).reshape(-1), np.asarray(y0, np.float64).reshape(-1)
    if len(x0) == 0:
        return np.zeros(0, np.float32)
    offs = (np.arange(int(samples)) + 0.5) * (float(size) / int(samples))
    iy = np.floor((y0[:, None] + offs[None, :]) / float(mask_downsample)).astype(np.int64)
    ix = np.floor((x0[:, None] + offs[None, :]) / float(mask_downsample)).astype(np.int64)
    m = np.asarray(mask, dtype=np.float32)
    vy = (iy >= 0) & (iy < m.shape[0])
    vx = (ix >= 0) & (ix < m.shape[1])
    vals = m[np.clip(iy, 0, m.shape[0] - 1)[:, :, None], np.clip(ix, 0, m.shape[1] - 1)[:, None, :]]
    vals = vals * (vy[:, :, None] & vx[:, None, :])
    return vals.mean(axis=(1, 2)).astype(np.float32)


def tile_targets(label_mask: np.ndarray, tissue: np.ndarray | None = None, exhaustive: bool = True,
                 valid: np.ndarray | None = None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Training targets of a tile from its label mask: 1 tumor, 0 not tumor, ``ignore_index`` unknown.

    Annotated tumor is 1 and annotated normal 0. Unannotated pixels are 0 when the annotation is ``exhaustive``
    (all tumor is outlined, as in Camelyon16); otherwise unannotated tissue is unknown (``ignore_index``) and only
    unannotated background (no tissue) is 0. Pixels outside ``valid`` (the padding past the slide border) are
    ignored.

    Args:
        label_mask: ``(h, w)`` uint8, 0 unannotated, 1 normal, 2 tumor.
        tissue: ``(h, w)`` bool tissue mask (needed when not ``exhaustive``).
        exhaustive: unannotated means not tumor.
        valid: ``(h, w)`` bool, False where the tile lies past the slide.
        ignore_index: the target value of ignored pixels.

    Returns:
        ``(h, w)`` int64 targets.
    """
    lab = np.asarray(label_mask)
    out = np.zeros(lab.shape, np.int64)
    if not exhaustive:
        if tissue is None:
            raise ConfigError("`exhaustive=False` needs the tissue mask: unannotated tissue is left out of the loss.")
        out[(lab == ann.MASK_UNANNOTATED) & np.asarray(tissue, bool)] = ignore_index
    out[lab == MASK_NORMAL] = 0
    out[lab == MASK_TUMOR] = 1
    if valid is not None:
        out[~np.asarray(valid, bool)] = ignore_index
    return out


@dataclass
class SlideLabels:
    """A slide's annotation as a source of label masks (0 unannotated, 1 normal, 2 tumor) at any resolution.

    Polygon files (every format :func:`~monai_wsi_ext.io.annotations.read_annotations` reads) are read once and
    rasterised for each requested window only, with the pixel-centre rule of
    :func:`~monai_wsi_ext.io.annotations.rasterize_annotations`; a label-mask image (PNG or TIFF,
    :func:`~monai_wsi_ext.io.annotations.read_label_mask`) is read once at the coarsest pyramid level that is at
    least as fine as ``label_downsample`` and sampled at the window's pixel centres (it stays in memory: about
    one byte per target pixel for a pyramid without a level near the target). Without an annotation every window
    is unannotated.

    Use :meth:`from_file`. Problems that do not stop the slide (ignored classes, skipped items, parts outside
    the slide) are in ``warnings``.

    Attributes:
        slide_size: level-0 ``(width, height)``.
        source: the annotation file, or None.
        polygons: the polygons (polygon files).
        image: the label-mask image (label-mask files).
        image_downsample: level-0 pixels per label-mask pixel.
        warnings: notes for the run's summary.
    """

    slide_size: tuple[int, int]
    source: str | None = None
    polygons: list = field(default_factory=list)
    image: np.ndarray | None = None
    image_downsample: float = 1.0
    warnings: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``polygons``, ``image`` or ``none``."""
        if self.image is not None:
            return "image"
        return "polygons" if self.source is not None else "none"

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, slide_size: Sequence[int], label_downsample: float = 1.0,
                  class_map: Mapping[str, str] | None = None, tumor_values: Sequence[int] = (1, 255),
                  normal_values: Sequence[int] = (), max_outside_fraction: float = 1.0,
                  clip: bool = False) -> SlideLabels:
        """Read a slide's annotation.

        Args:
            path: an annotation file (``.xml``, ``.geojson``, ``.json``) or a label-mask image (``.png``, ``.tif``,
                ``.tiff``); None for a slide without annotation.
            slide_size: level-0 ``(width, height)``.
            label_downsample: the finest resolution the masks will be asked for (level-0 pixels per pixel; the
                target downsample): picks the label-mask image's pyramid level.
            class_map: class name -> label for polygon files.
            tumor_values: label-mask values meaning tumor.
            normal_values: label-mask values meaning normal.
            max_outside_fraction: see :func:`~monai_wsi_ext.io.annotations.check_annotation_extent`.
            clip: clip polygons to the slide instead of failing when too much lies outside.

        Raises:
            AnnotationError: the file cannot be read, lies outside the slide, or a label mask's aspect ratio is not
                the slide's.
        """
        width, height = int(slide_size[0]), int(slide_size[1])
        if path is None:
            return cls((width, height))
        path = Path(path)
        if path.suffix.lower() in LABEL_MASK_SUFFIXES:
            level = ann.label_mask_level_for(path, width, max(float(label_downsample), 1.0))
            image = ann.read_label_mask(path, level=level, tumor_values=tuple(tumor_values),
                                        normal_values=tuple(normal_values))
            if abs((image.shape[1] / image.shape[0]) / (width / height) - 1.0) > 0.05:
                raise ann.AnnotationError(path, f"label mask of {image.shape[1]} x {image.shape[0]} px does not have "
                                                f"the aspect ratio of the {width} x {height} px slide: another "
                                                "slide's mask?")
            notes = [] if (image == MASK_TUMOR).any() or (image == MASK_NORMAL).any() else [
                f"{path}: label mask has no tumor value {tuple(tumor_values)}: the slide is treated as having no "
                "tumor"]
            return cls((width, height), str(path), image=image, image_downsample=width / image.shape[1],
                       warnings=notes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ann.AnnotationWarning)
            polygons = ann.read_annotations(path, class_map=class_map)
        notes = [str(w.message) for w in caught if issubclass(w.category, ann.AnnotationWarning)]
        notes += ann.annotation_warnings(polygons, path)
        polygons, extent_notes = ann.check_annotation_extent(polygons, (width, height),
                                                             max_outside_fraction=float(max_outside_fraction),
                                                             clip=bool(clip), path_for_errors=path)
        used = [p for p in polygons if p.label in (ann.AnnotationLabel.TUMOR, ann.AnnotationLabel.NORMAL,
                                                   ann.AnnotationLabel.EXCLUDE)]
        return cls((width, height), str(path), polygons=used, warnings=notes + extent_notes)

    def window(self, origin: Sequence[float], shape: Sequence[int], downsample: float) -> np.ndarray:
        """The label mask of a window of a pixel grid.

        Args:
            origin: ``(x, y)`` of the window's top-left pixel, in pixels of the grid (level-0 ``origin * d``).
            shape: ``(rows, cols)`` of the window.
            downsample: level-0 pixels per pixel ``d``.

        Returns:
            ``shape`` uint8 mask, 0 unannotated (also past the slide), 1 normal, 2 tumor.
        """
        rows, cols = int(shape[0]), int(shape[1])
        if self.image is not None:
            return sample_mask(self.image, self.image_downsample, (rows, cols), downsample, origin, fill=0)
        if not self.polygons:
            return np.zeros((rows, cols), np.uint8)
        d = float(downsample)
        ox, oy = float(origin[0]) * d, float(origin[1]) * d
        x1, y1 = ox + cols * d, oy + rows * d
        shifted = []
        for p in self.polygons:
            lo, hi = p.exterior.min(axis=0), p.exterior.max(axis=0)
            if hi[0] < ox or hi[1] < oy or lo[0] > x1 or lo[1] > y1:
                continue
            off = np.array([ox, oy])
            shifted.append(ann.AnnotationPolygon(p.exterior - off, [h - off for h in p.holes], p.label, p.name,
                                                 p.group))
        if not shifted:
            return np.zeros((rows, cols), np.uint8)
        with warnings.catch_warnings():
            # a window cuts through polygons by design: their vertices outside it are expected
            warnings.simplefilter("ignore", ann.AnnotationWarning)
            return ann.rasterize_annotations(shifted, (rows, cols), d, path_for_errors=self.source)

    def mask(self, shape: Sequence[int], downsample: float) -> np.ndarray:
        """The whole-slide label mask of a ``shape`` grid at ``downsample`` (``window((0, 0), shape, downsample)``)."""
        return self.window((0, 0), shape, downsample)
