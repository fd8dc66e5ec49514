"""Tissue detection on a low-resolution image of the slide: Otsu threshold, then small objects and holes removed.

Pen marks (ink) are excluded by default: pixels that are very dark and neutral or bluish (black ink), saturated blue
or saturated green, in blobs wider than about 20 µm (thinner coloured fringes at tissue edges are kept), widened by
that margin. H&E never stains green, blue-black or black-neutral, and hematoxylin is violet rather than blue; dark
anthracotic pigment in lymph nodes can be taken for black ink. ``exclude_ink=False`` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from scipy import ndimage
from skimage import color, filters, morphology, transform

from monai_wsi_ext.errors import TissueError
from monai_wsi_ext.io.atomic import atomic_path
from monai_wsi_ext.io.wsi import Slide

__all__ = ["TissueMask", "detect_tissue", "tissue_mask_from_image", "ink_mask", "rgb_to_hsv", "load_external_mask",
           "save_mask_png", "load_mask_png", "ASSUMED_MPP"]

logger = logging.getLogger(__name__)

# Floors under the Otsu threshold: a blank slide has a bimodal-looking noise histogram too, and Otsu would call
# half of the glass "tissue". Stained tissue is well above these.
_MIN_THRESHOLD = {"saturation": 0.05, "gray": 0.04, "od": 0.06}

#: level-0 µm/px assumed for the µm-based settings of tissue detection when a slide has no mpp (reported)
ASSUMED_MPP = 0.5
# ink colours (HSV in [0, 1]): black ink is very dark and neutral or bluish; blue and green inks are saturated
_INK_DARK_V, _INK_DARK_NEUTRAL_S = 0.2, 0.25
_INK_BLUE_HUE, _INK_BLUE_S = (0.5, 0.68), 0.35  # hematoxylin is violet (hue > 0.7), eosin pink (> 0.85)
_INK_GREEN_HUE, _INK_GREEN_S = (0.2, 0.5), 0.2
# half-width of the ink blobs kept (thinner structures, e.g. cyan fringes at tissue edges, are not ink)
_INK_RADIUS_UM = 10.0


@dataclass
class TissueMask:
    """A boolean tissue mask and its scale.

    Attributes:
        mask: ``(h, w)`` bool array.
        downsample: level-0 pixels per mask pixel.
        threshold: the threshold applied (on the chosen channel), or None for an external mask.
        channel: ``saturation``, ``gray``, ``od`` or ``external``.
        ink_fraction: fraction of the image excluded as pen marks (0 when ink exclusion is off).
        warnings: problems worth a line in a run's summary (e.g. sizes converted with an assumed mpp), as text.
    """

    mask: np.ndarray
    downsample: float
    threshold: float | None = None
    channel: str = "saturation"
    ink_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation and value planes of an RGB image, equal to :func:`skimage.color.rgb2hsv` of
    ``image / 255`` in float32 (the same operations in the same order, so bit for bit) but computed per plane:
    scikit-image's ``np.ptp`` over the interleaved last axis made tissue detection the largest fixed cost of a
    slide's inference (about 1.2 s per call on a 2048 px thumbnail here, called twice).

    Args:
        image: ``(h, w, 3)`` (or more channels; the first three are used) uint8 RGB.

    Returns:
        ``(hue, saturation, value)``, float32 ``(h, w)`` planes in [0, 1].
    """
    rgb = image[..., :3].astype(np.float32) / np.float32(255.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    val = np.maximum(np.maximum(r, g), b)
    delta = val - np.minimum(np.minimum(r, g), b)
    flat = delta == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = delta / val
        # the channel holding the maximum, later ones winning ties (as scikit-image assigns red, green, blue)
        hue = np.where(b == val, np.float32(4.0) + (r - g) / delta,
                       np.where(g == val, np.float32(2.0) + (b - r) / delta, (g - b) / delta))
    sat[flat] = 0.0
    hue = (hue / np.float32(6.0)) % np.float32(1.0)
    hue[flat] = 0.0
    return hue.astype(np.float32, copy=False), sat.astype(np.float32, copy=False), val


def _channel(image: np.ndarray, channel: str, hsv: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    if channel == "saturation":
        return (hsv or rgb_to_hsv(image))[1]
    rgb = image[..., :3].astype(np.float32) / 255.0
    if channel == "gray":
        return 1.0 - color.rgb2gray(rgb)
    if channel == "od":
        return (-np.log(np.clip(rgb, 1 / 255.0, 1.0))).mean(axis=-1)
    raise ValueError(f"`channel` must be 'saturation', 'gray' or 'od', got {channel!r}.")


def ink_mask(image: np.ndarray, radius_px: int = 1, hsv: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Pen marks in an RGB image: very dark neutral/bluish, saturated blue or saturated green pixels, in blobs at
    least ``2 * radius_px + 1`` pixels wide, widened by ``radius_px + 1`` pixels (their anti-aliased edges).

    Args:
        image: ``(h, w, 3)`` uint8 RGB.
        radius_px: radius of the opening that drops thin structures (>= 0; 0 keeps every ink-coloured pixel).
        hsv: the image's :func:`rgb_to_hsv` planes when the caller has them already.

    Returns:
        ``(h, w)`` bool mask, True on ink.
    """
    hue, sat, val = hsv or rgb_to_hsv(image)
    bluish = (hue >= 0.45) & (hue < _INK_BLUE_HUE[1])
    dark = (val < _INK_DARK_V) & ((sat < _INK_DARK_NEUTRAL_S) | bluish)
    blue = (hue >= _INK_BLUE_HUE[0]) & (hue < _INK_BLUE_HUE[1]) & (sat >= _INK_BLUE_S)
    green = (hue >= _INK_GREEN_HUE[0]) & (hue < _INK_GREEN_HUE[1]) & (sat >= _INK_GREEN_S)
    ink = dark | blue | green
    radius_px = int(max(radius_px, 0))
    if radius_px > 0 and ink.any():
        ink = ndimage.binary_opening(ink, structure=morphology.disk(radius_px))
    if ink.any():
        ink = ndimage.binary_dilation(ink, structure=morphology.disk(radius_px + 1))
    return ink


def tissue_mask_from_image(
    image: np.ndarray, downsample: float = 1.0, channel: str = "saturation", min_object_px: int = 64,
    min_hole_px: int = 64, min_threshold: float | None = None, exclude_ink: bool = True, ink_radius_px: int = 1,
) -> TissueMask:
    """Otsu tissue mask of an RGB image, without pen marks unless ``exclude_ink=False``.

    Args:
        image: ``(h, w, 3)`` uint8 RGB (a thumbnail).
        downsample: level-0 pixels per image pixel (stored with the mask).
        channel: ``saturation`` (HSV S; robust to pale background), ``gray`` (1 - luminance) or ``od``
            (mean optical density).
        min_object_px: connected tissue components smaller than this many mask pixels are removed.
        min_hole_px: holes smaller than this many mask pixels are filled.
        min_threshold: floor under the Otsu threshold (defaults per channel), so near-blank glass stays empty.
        exclude_ink: remove pen marks (:func:`ink_mask`) from the tissue; the Otsu threshold is computed without
            them too.
        ink_radius_px: see :func:`ink_mask`.
    """
    hsv = rgb_to_hsv(image) if channel == "saturation" or exclude_ink else None
    values = _channel(image, channel, hsv)
    ink = ink_mask(image, ink_radius_px, hsv) if exclude_ink else np.zeros(values.shape, bool)
    floor = _MIN_THRESHOLD[channel] if min_threshold is None else float(min_threshold)
    sample = values[~ink] if ink.any() and not ink.all() else values.ravel()
    try:
        otsu = float(filters.threshold_otsu(sample)) if np.ptp(sample) > 0 else float(sample.max())
    except ValueError:
        otsu = floor
    threshold = max(otsu, floor)
    mask = (values > threshold) & ~ink
    if min_object_px > 0:
        mask = morphology.remove_small_objects(mask, max_size=int(min_object_px) - 1) if _has_max_size() else \
            morphology.remove_small_objects(mask, min_size=int(min_object_px))
    if min_hole_px > 0:
        mask = morphology.remove_small_holes(mask, max_size=int(min_hole_px) - 1) if _has_max_size() else \
            morphology.remove_small_holes(mask, area_threshold=int(min_hole_px))
    if ink.any():
        # holes left by ink inside tissue must stay out; fragments cut off by a stroke go like other small objects
        mask &= ~ink
        if min_object_px > 0:
            mask = morphology.remove_small_objects(mask, max_size=int(min_object_px) - 1) if _has_max_size() else \
                morphology.remove_small_objects(mask, min_size=int(min_object_px))
    return TissueMask(mask=mask.astype(bool), downsample=float(downsample), threshold=threshold, channel=channel,
                      ink_fraction=float(ink.mean()) if ink.size else 0.0)


def _has_max_size() -> bool:
    # scikit-image 0.26 renamed min_size/area_threshold to max_size (and deprecated the old names)
    import inspect

    return "max_size" in inspect.signature(morphology.remove_small_objects).parameters


def detect_tissue(
    slide: Slide, level: int | None = None, max_size: int = 2048, channel: str = "saturation",
    min_object_um2: float = 20000.0, min_hole_um2: float = 20000.0, external_mask: str | os.PathLike | None = None,
    exclude_ink: bool = True,
) -> TissueMask:
    """Detect tissue on a low-resolution image of ``slide`` (or load an external mask instead).

    The thumbnail read is bounded (see :meth:`~monai_wsi_ext.io.wsi.Slide.thumbnail`); with ``external_mask`` the
    slide is not read at all.

    Args:
        slide: an open slide.
        level: read this pyramid level; by default the coarsest level whose longer side is at most ``max_size``.
        max_size: longest side of the thumbnail when ``level`` is None.
        channel: see :func:`tissue_mask_from_image`.
        min_object_um2: smallest tissue component kept, in µm² (converted with the slide's mpp; 0.5 µm/px assumed
            when the slide has none, and said so in ``warnings``).
        min_hole_um2: largest hole filled, in µm².
        external_mask: a PNG/TIFF mask (nonzero = tissue) to use instead of Otsu; it is resized to the thumbnail.
        exclude_ink: remove pen marks from the tissue (see :func:`ink_mask`).
    """
    if external_mask is not None:
        _, _, shape, downsample = slide.thumbnail_geometry(max_size=max_size, level=level, max_read_pixels=2 ** 62)
        mask = load_external_mask(external_mask, shape)
        return TissueMask(mask=mask, downsample=downsample, threshold=None, channel="external")
    image, downsample = slide.thumbnail(max_size=max_size, level=level)
    mpp = slide.mpp if slide.mpp is not None else ASSUMED_MPP
    px_um = mpp * downsample
    result = tissue_mask_from_image(image, downsample, channel, min_object_px=int(min_object_um2 / px_um ** 2),
                                    min_hole_px=int(min_hole_um2 / px_um ** 2), exclude_ink=exclude_ink,
                                    ink_radius_px=max(1, int(round(_INK_RADIUS_UM / px_um))))
    if slide.mpp is None:
        result.warnings.append(f"no mpp: tissue detection's size settings (min_object_um2={min_object_um2:g}, "
                               f"min_hole_um2={min_hole_um2:g}, the ink blob width) assumed {ASSUMED_MPP} µm/px")
    if result.ink_fraction > 0:
        logger.info("%s: %.2f%% of the thumbnail excluded as pen marks", slide.path, 100 * result.ink_fraction)
    logger.debug("%s: tissue %.1f%% of the thumbnail (threshold %.3f on %s)", slide.path, 100 * result.fraction,
                 result.threshold, channel)
    return result


def load_external_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read a PNG/TIFF tissue mask (nonzero = tissue) and resize it (nearest) to ``shape``.

    Raises:
        TissueError: the file is missing or unreadable.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                pages = sorted(tif.pages, key=lambda p: p.shape[0] * p.shape[1])
                # the smallest page that is still at least as large as the target, else the largest
                page = next((p for p in pages if p.shape[0] >= shape[0] and p.shape[1] >= shape[1]), pages[-1])
                arr = page.asarray()
        else:
            arr = np.asarray(Image.open(path))
    except Exception as e:  # noqa: BLE001
        raise TissueError(f"{path}: cannot read the external tissue mask ({e})") from e
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] <= 4 else arr[0]
    arr = arr > 0
    if arr.shape != tuple(shape):
        arr = transform.resize(arr, shape, order=0, preserve_range=True, anti_aliasing=False).astype(bool)
    return arr


def save_mask_png(path: str | os.PathLike, mask: TissueMask) -> Path:
    """Save the mask as an 8-bit PNG (255 = tissue) with its downsample in a PNG text chunk, atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text("monai_wsi_ext", json.dumps({"downsample": mask.downsample, "threshold": mask.threshold,
                                               "channel": mask.channel}))
    with atomic_path(path) as tmp:
        Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def load_mask_png(path: str | os.PathLike) -> TissueMask:
    """Read a mask written by :func:`save_mask_png`."""
    img = Image.open(path)
    meta = json.loads(img.text.get("monai_wsi_ext", "{}")) if hasattr(img, "text") else {}
    return TissueMask(mask=np.asarray(img) > 0, downsample=float(meta.get("downsample", 1.0)),
                      threshold=meta.get("threshold"), channel=meta.get("channel", "external"))
