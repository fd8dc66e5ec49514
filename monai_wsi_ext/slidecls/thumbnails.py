"""The whole slide as one fixed-size network input, and the slide's label.

:func:`slide_thumbnail` reads the slide at a fixed resolution (``thumb_mpp`` µm/px, default 8) through the project's
reader (:class:`~monai_wsi_ext.tileseg.tiles.SlideAtMpp`: the coarsest pyramid level at least as fine, area-averaged;
one factor for both axes, so the slide is never stretched) and pads it with white to a ``size`` x ``size`` square,
centred. Every pixel of every thumbnail then covers the same physical area whatever the scanner, which is what a CNN
on whole slides needs. A slide larger than ``size`` at ``thumb_mpp`` is read at the coarser resolution that fits
(``oversize="fit"``, the resolution used is returned and recorded) or refused (``oversize="error"``).

:func:`slide_target` is the slide's class: tumor / no tumor from its annotation (a slide declared tumor-free at
preparation has none), or the Camelyon17 class (negative, ITC, micro, macro) from the longest diameter of its
largest annotated tumor region (:func:`~monai_wsi_ext.evaluation.metrics.slide_class_from_mask`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.evaluation import metrics as M
from monai_wsi_ext.io.wsi import Slide
from monai_wsi_ext.labels import LABEL_TUMOR, MASK_TUMOR
from monai_wsi_ext.prep.prepare import PreparedSlide
from monai_wsi_ext.tileseg.masks import SlideLabels
from monai_wsi_ext.tileseg.tiles import PAD_VALUE, SlideAtMpp

__all__ = ["SLIDE_CLASSES", "OVERSIZE_MODES", "slide_thumbnail", "slide_target", "tumor_score"]

logger = logging.getLogger(__name__)

#: class names of the slide classifications, in class-index order
SLIDE_CLASSES = {"binary": ("no_tumor", "tumor"), "camelyon17": tuple(c.value for c in M.SlideClass)}
#: what :func:`slide_thumbnail` does with a slide larger than the input at the target resolution
OVERSIZE_MODES = ("fit", "error")


def slide_thumbnail(slide: Slide, thumb_mpp: float = 8.0, size: int = 256, oversize: str = "fit",
                    pad_value: int = PAD_VALUE) -> tuple[np.ndarray, dict]:
    """The slide at ``thumb_mpp`` µm/px, padded (centred) to a ``size`` x ``size`` square.

    Args:
        slide: an open slide with a known mpp.
        thumb_mpp: resolution of the thumbnail, µm/px.
        size: side of the square input, pixels.
        oversize: ``fit`` (a slide larger than ``size`` at ``thumb_mpp`` is read at the coarser resolution that
            fits, aspect kept) or ``error``.
        pad_value: RGB value of the padding (white: glass).

    Returns:
        ``(image (size, size, 3) uint8, info)``; ``info``: ``mpp`` used, ``shape`` ``(rows, cols)`` of the slide
        in the thumbnail, ``offset`` ``(y, x)`` of its top-left pixel, ``fitted`` (True when the resolution was
        coarsened).

    Raises:
        ConfigError: a bad setting, a slide without mpp, or an oversize slide with ``oversize="error"``.
    """
    if oversize not in OVERSIZE_MODES:
        raise ConfigError(f"`oversize` must be one of {OVERSIZE_MODES}, got {oversize!r}.")
    if int(size) < 8:
        raise ConfigError(f"`thumb_size` must be at least 8 px, got {size!r}.")
    size = int(size)
    view = SlideAtMpp(slide, float(thumb_mpp))
    mpp, fitted = float(thumb_mpp), False
    if max(view.shape) > size:
        if oversize == "error":
            raise ConfigError(f"{slide.path}: {view.shape[1]} x {view.shape[0]} px at {thumb_mpp} µm/px does not fit "
                              f"a {size} px input; raise `thumb_mpp`/`thumb_size` or use oversize='fit'.")
        w, h = slide.dimensions
        mpp = float(slide.mpp) * max(w, h) / size * (1 + 1e-9)
        view, fitted = SlideAtMpp(slide, mpp), True
        logger.warning("%s: larger than %d px at %g µm/px; read at %.4g µm/px to fit", slide.path, size, thumb_mpp,
                       mpp)
    rows, cols = view.shape
    img = view.read(0, 0, cols, rows)
    out = np.full((size, size, 3), int(pad_value), np.uint8)
    oy, ox = (size - rows) // 2, (size - cols) // 2
    out[oy:oy + rows, ox:ox + cols] = img[..., :3]
    return out, {"mpp": mpp, "shape": [int(rows), int(cols)], "offset": [int(oy), int(ox)], "fitted": fitted}


def slide_target(prepared: PreparedSlide, classes: str = "binary", class_map: Mapping[str, str] | None = None,
                 mask_um: float = 8.0) -> int:
    """The class index of a prepared slide (:data:`SLIDE_CLASSES`).

    Binary: 1 when the slide's annotation has tumor (polygons or label-mask tumor pixels), 0 when it has none or
    the slide was declared tumor-free at preparation; without an annotation, 1 when a grid cell is labelled tumor.
    ``camelyon17``: the class of the annotated tumor mask rasterised at ``mask_um`` µm/px (needs the mpp).

    Raises:
        ConfigError: an unknown ``classes``, or Camelyon17 classes for a slide without mpp.
    """
    if classes not in SLIDE_CLASSES:
        raise ConfigError(f"`slide_classes` must be one of {sorted(SLIDE_CLASSES)}, got {classes!r}.")
    annotation = prepared.meta.get("annotation")
    if classes == "binary" and annotation is None:
        return int(bool((np.asarray(prepared.grid.labels) == LABEL_TUMOR).any()))
    mpp = prepared.mpp
    if mpp is None:
        if classes == "camelyon17":
            raise ConfigError(f"{prepared.image}: Camelyon17 slide classes need the slide's mpp.")
        mpp = 1.0
    w, h = prepared.dimensions
    d = max(float(mask_um) / float(mpp), 1.0)
    labels = SlideLabels.from_file(annotation, (w, h), d, class_map=class_map)
    mask = labels.mask((math.ceil(h / d), math.ceil(w / d)), d) == MASK_TUMOR
    if classes == "binary":
        return int(mask.any())
    return SLIDE_CLASSES["camelyon17"].index(M.slide_class_from_mask(mask, d * float(mpp)))


def tumor_score(probs: np.ndarray, classes: str = "binary") -> float:
    """P(tumor) of one slide's class probabilities: ``probs[1]`` (binary), ``1 - P(negative)`` (Camelyon17)."""
    p = np.asarray(probs, np.float64).ravel()
    if classes == "binary":
        return float(p[1])
    return float(1.0 - p[SLIDE_CLASSES["camelyon17"].index("negative")])
