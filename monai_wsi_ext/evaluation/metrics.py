"""Evaluation metrics: patch classification, slide AUC, Camelyon16 lesion FROC, Camelyon17 slide classes and pN-stage.

Conventions used throughout this module:

* **Grid labels** (one integer per patch cell, array ``(H, W)``): :data:`LABEL_TUMOR` ``= 1``,
  :data:`LABEL_NORMAL` ``= 0``, :data:`LABEL_NOLABEL` ``= -1`` (ambiguous patch, excluded from every patch
  metric), :data:`LABEL_BACKGROUND` ``= -2`` (no tissue, not a patch); defined in :mod:`monai_wsi_ext.labels`.
* **Predicted tumor** is ``prob > threshold`` (strict). With the default 0.5 this is the arg-max of a two-class
  softmax whose ties go to class 0 (normal), and it is the same comparison MONAI's ``ProbNMS`` uses.
* Undefined values (an AUC over one class only, a kappa without disagreement to compare, a Dice of two empty
  masks) are ``float("nan")`` with a logged warning, never an exception. Every function returns plain Python
  ``float``/``int``/``str``/``list``/``dict`` values, so the results can be written as JSON directly
  (``json.dumps`` writes ``NaN`` for NaN).

The Camelyon16 lesion FROC is composed from MONAI's own pieces, on arrays, with the arithmetic of
:class:`monai.apps.pathology.metrics.LesionFROC`: ``compute_multi_instance_mask`` and
``compute_isolated_tumor_cells`` prepare the ground truth, ``compute_fp_tp_probs_nd`` classifies lesion candidates,
``compute_froc_curve_data`` and ``compute_froc_score`` give the curve and the score. See :func:`lesion_froc`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from monai.apps.pathology.utils import compute_isolated_tumor_cells, compute_multi_instance_mask
from monai.metrics import compute_fp_tp_probs_nd, compute_froc_curve_data, compute_froc_score
from monai.transforms import ProbNMS
from skimage.measure import label as label_components
from skimage.measure import regionprops
from sklearn.metrics import accuracy_score, average_precision_score, cohen_kappa_score, roc_auc_score

from monai_wsi_ext.labels import GRID_LABELS as _KNOWN_LABELS
from monai_wsi_ext.labels import LABEL_BACKGROUND, LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR

__all__ = [
    "LABEL_TUMOR",
    "LABEL_NORMAL",
    "LABEL_NOLABEL",
    "LABEL_BACKGROUND",
    "CAMELYON16_FP_RATES",
    "PATCHES_KEY",
    "SlideClass",
    "PNStage",
    "PN_STAGE_ORDER",
    "FrocSampleKeys",
    "patch_metrics",
    "slide_auc",
    "heatmap_candidates",
    "prepare_froc_ground_truth",
    "lesion_froc",
    "largest_tumor_diameter_um",
    "slide_class",
    "slide_class_from_mask",
    "pn_stage",
    "quadratic_kappa",
    "count_tumor_points",
    "dice",
    "evaluate_slide",
    "summarize",
]

logger = logging.getLogger(__name__)

CAMELYON16_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per slide at which the Camelyon16 FROC score averages the sensitivity."""

PATCHES_KEY = "patches"
"""Key of :func:`evaluate_slide`'s raw per-patch values, which :func:`summarize` pools; drop it before writing CSV."""

_NAN = float("nan")


class SlideClass(StrEnum):
    """Camelyon17 slide-level metastasis class."""

    NEGATIVE = "negative"
    ITC = "itc"
    MICRO = "micro"
    MACRO = "macro"


class PNStage(StrEnum):
    """Camelyon17 patient-level pN-stage (the five stages the challenge uses)."""

    PN0 = "pN0"
    PN0_ITC = "pN0(i+)"
    PN1MI = "pN1mi"
    PN1 = "pN1"
    PN2 = "pN2"


PN_STAGE_ORDER: tuple[str, ...] = tuple(s.value for s in PNStage)
"""pN-stages from least to most severe; the ordinal scale of :func:`quadratic_kappa`."""


class FrocSampleKeys(StrEnum):
    """Keys of one slide's entry in :func:`lesion_froc`'s ``samples``."""

    PROB_MAP = "prob_map"  # (H, W) tumor probability at grid resolution
    CELL_SIZE = "cell_size"  # level-0 pixels per grid cell (the patch size at level 0)
    ORIGIN = "origin"  # optional (x, y) level-0 pixel of the top-left corner of grid cell (0, 0); default (0, 0)
    CANDIDATES = "candidates"  # optional instead of prob_map: (probs, x, y) arrays, x/y in level-0 pixels
    TUMOR_MASK = "tumor_mask"  # (h, w) ground truth, non-zero = tumor
    MASK_DOWNSAMPLE = "mask_downsample"  # level-0 pixels per mask pixel (e.g. 2**level)
    MPP = "mpp"  # level-0 microns per pixel


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _as_2d(array: Any, name: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D (H, W) array, got shape {arr.shape}; squeeze channel axes first.")
    return arr


def _predicted(prob_map: Any, threshold: float, name: str = "prob_map") -> np.ndarray:
    """Boolean predicted-tumor map ``prob > threshold`` (NaN counts as not tumor)."""
    probs = _as_2d(prob_map, name).astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):
        return probs > float(threshold)


def _check_binary(mask: Any, name: str) -> np.ndarray:
    arr = _as_2d(mask, name)
    if arr.dtype != bool:
        values = np.unique(arr)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(
                f"`{name}` must be boolean or hold only 0/1, got values {values[:8].tolist()}; "
                f"pass `label_grid == LABEL_TUMOR` for a grid of labels."
            )
    return arr.astype(bool)


def _positive(value: float, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    return out


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([_NAN if v is None else float(v) for v in values], dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return _NAN
    return float(np.nanmean(arr))


# ----------------------------------------------------------------------------------------------------------------------
# patch and slide classification


def patch_metrics(probs: Any, labels: Any, threshold: float = 0.5) -> dict[str, float | int]:
    """Patch-level tumor/normal metrics with nolabel (and background) cells excluded, as in the paper.

    Args:
        probs: tumor probabilities, any shape (e.g. a grid ``(H, W)`` or a flat list of patches).
        labels: integer labels of the same shape: 1 tumor, 0 normal, -1 nolabel, -2 background.
        threshold: a patch is predicted tumor when ``prob > threshold``.

    Returns:
        ``accuracy`` (at ``threshold``), ``pr_auc`` (average precision, scikit-learn), ``roc_auc``, ``n`` (patches
        evaluated), ``n_tumor``, ``n_normal``, ``n_correct``. With no evaluated patch every score is NaN; with only
        one class both AUCs are NaN (logged).

    Raises:
        ValueError: when the shapes differ, a label is not one of 1/0/-1/-2, or an evaluated probability is not finite.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"`probs` and `labels` must have the same shape, got {p.shape} and {y.shape}.")
    p, y = p.ravel(), y.ravel()
    unknown = np.setdiff1d(np.unique(y), _KNOWN_LABELS)
    if unknown.size:
        raise ValueError(
            f"`labels` may hold only {_KNOWN_LABELS} (tumor, normal, nolabel, background), got also {unknown.tolist()}."
        )
    keep = (y == LABEL_TUMOR) | (y == LABEL_NORMAL)
    p, y = p[keep], (y[keep] == LABEL_TUMOR).astype(np.int64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"`probs` holds {int(np.sum(~np.isfinite(p)))} non-finite values on tumor/normal patches.")
    n, n_tumor = int(y.size), int(y.sum())
    out: dict[str, float | int] = {
        "accuracy": _NAN,
        "pr_auc": _NAN,
        "roc_auc": _NAN,
        "n": n,
        "n_tumor": n_tumor,
        "n_normal": n - n_tumor,
        "n_correct": 0,
    }
    if n == 0:
        logger.warning("patch_metrics: no tumor or normal patch to evaluate; all scores are NaN.")
        return out
    pred = (p > float(threshold)).astype(np.int64)
    out["accuracy"] = float(accuracy_score(y, pred))
    out["n_correct"] = int(np.sum(pred == y))
    if n_tumor in (0, n):
        logger.warning(
            "patch_metrics: only %s patches (%d), PR-AUC and ROC-AUC are undefined and set to NaN.",
            "tumor" if n_tumor else "normal",
            n,
        )
        return out
    out["pr_auc"] = float(average_precision_score(y, p))
    out["roc_auc"] = float(roc_auc_score(y, p))
    return out


def slide_auc(scores: Sequence[float], slide_labels: Sequence[int]) -> float:
    """ROC-AUC of a slide-level score (e.g. the heatmap maximum) over slides (Camelyon16 slide classification).

    Args:
        scores: one score per slide, higher meaning more likely to contain tumor.
        slide_labels: 1 (or True) for a slide with tumor, 0 for a normal slide.

    Returns:
        The area under the ROC curve; NaN (logged) when all slides have the same label.

    Raises:
        ValueError: when the lengths differ, a label is not 0/1 or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(slide_labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"`scores` and `slide_labels` must have the same length, got {s.size} and {y.size}.")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"`slide_labels` must be 0/1, got {np.unique(y).tolist()}.")
    if not np.all(np.isfinite(s)):
        raise ValueError("`scores` must be finite.")
    if np.unique(y).size < 2:
        logger.warning("slide_auc: %d slides all of one class; the AUC is undefined and set to NaN.", y.size)
        return _NAN
    return float(roc_auc_score(y.astype(np.int64), s))


# ----------------------------------------------------------------------------------------------------------------------
# Camelyon16 lesion FROC


def heatmap_candidates(
    prob_map: Any,
    cell_size: float,
    threshold: float = 0.5,
    mode: str = "components",
    origin: Sequence[float] = (0.0, 0.0),
    nms_box_size: int = 3,
    nms_sigma: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion candidates ``(prob, x, y)`` in level-0 pixels from a grid-resolution heatmap (Camelyon16 CSV points).

    Two choices of candidate:

    * ``"components"`` (default): the 8-connected components of ``prob > threshold``; each gives **one** point, the
      centre of its most probable cell, with that probability. A lesion covered by many patches is then one
      detection, and a false-positive region is counted once, whatever the grid resolution.
    * ``"nms"``: MONAI's :class:`~monai.transforms.ProbNMS` (as :class:`LesionFROC` uses): repeatedly take the
      maximum above ``threshold`` and clear a ``nms_box_size`` box of cells around it (optionally after a Gaussian
      of ``nms_sigma`` cells). Large regions then give several points.

    A cell ``(r, c)`` covers level-0 ``x`` in ``[x0 + c * cell_size, x0 + (c + 1) * cell_size)``; its centre, the
    point reported, is ``x0 + (c + 0.5) * cell_size`` (the same ``+ 0.5`` as MONAI's ``PathologyProbNMS``).

    Args:
        prob_map: ``(H, W)`` tumor probability per grid cell.
        cell_size: level-0 pixels per cell (the patch size at level 0).
        threshold: candidates need ``prob > threshold``.
        mode: ``"components"`` or ``"nms"``.
        origin: level-0 ``(x0, y0)`` of the top-left corner of cell ``(0, 0)``.
        nms_box_size: ``"nms"`` only: the suppressed box in cells (MONAI's default 48 px is for a level-6 map,
            about 0.75 mm; with 256-px cells at 0.25 µm/px that is 12 cells).
        nms_sigma: ``"nms"`` only: Gaussian smoothing in cells before suppression.

    Returns:
        ``(probs, x, y)`` float arrays of equal length, sorted by decreasing probability.

    Raises:
        ValueError: on an unknown ``mode``, a non-positive ``cell_size`` or a map that is not 2-D.
    """
    probs_map = _as_2d(prob_map, "prob_map").astype(np.float64)
    cell = _positive(cell_size, "cell_size")
    x0, y0 = (float(v) for v in origin)
    finite = np.where(np.isfinite(probs_map), probs_map, 0.0)
    if mode == "components":
        components = label_components(finite > float(threshold), connectivity=2)
        probs, rows, cols = [], [], []
        for region in regionprops(components):
            coords = region.coords  # (n, 2) rows/cols of the component's cells
            values = finite[coords[:, 0], coords[:, 1]]
            best = int(np.argmax(values))
            probs.append(float(values[best]))
            rows.append(int(coords[best, 0]))
            cols.append(int(coords[best, 1]))
    elif mode == "nms":
        nms = ProbNMS(spatial_dims=2, sigma=nms_sigma, prob_threshold=float(threshold), box_size=int(nms_box_size))
        # ProbNMS zeroes the map in place: hand it a copy; it reports [prob, row, col]
        found = nms(finite.astype(np.float32).copy())
        probs = [float(f[0]) for f in found]
        rows = [int(f[1]) for f in found]
        cols = [int(f[2]) for f in found]
    else:
        raise ValueError(f"`mode` must be 'components' or 'nms', got {mode!r}.")
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    x = x0 + (np.asarray(cols, dtype=np.float64) + 0.5) * cell
    y = y0 + (np.asarray(rows, dtype=np.float64) + 0.5) * cell
    return p[order], x[order], y[order]


def prepare_froc_ground_truth(
    tumor_mask: Any, mask_pixel_size_um: float, grow_distance_um: float = 75.0, itc_diameter_um: float = 200.0
) -> tuple[np.ndarray, list[int]]:
    """Camelyon16 evaluation targets from a binary tumor mask, with MONAI's helpers (as ``LesionFROC`` does).

    Tumor regions closer than ``grow_distance_um`` merge into one lesion (``compute_multi_instance_mask``); lesions
    whose major axis is below ``itc_diameter_um + grow_distance_um`` are isolated tumor cells, excluded from the
    targets and not counted as false positives either (``compute_isolated_tumor_cells``).

    Args:
        tumor_mask: ``(h, w)`` mask, non-zero = tumor.
        mask_pixel_size_um: microns per mask pixel (level-0 mpp times the mask's downsample).
        grow_distance_um: lesion growing distance, 75 µm (about five tumor cells) in Camelyon16.
        itc_diameter_um: the ITC size limit, 200 µm.

    Returns:
        ``(instance_mask, itc_labels)``: an int mask with one label per lesion, and the labels that are ITCs.
    """
    mask = (_as_2d(tumor_mask, "tumor_mask") != 0).astype(np.uint8)
    spacing = _positive(mask_pixel_size_um, "mask_pixel_size_um")
    instances = compute_multi_instance_mask(mask=mask, threshold=float(grow_distance_um) / (spacing * 2))
    instances = np.asarray(instances, dtype=np.int64)
    if instances.max(initial=0) == 0:
        return instances, []
    with warnings.catch_warnings():  # MONAI reads skimage's deprecated `major_axis_length`
        warnings.simplefilter("ignore", FutureWarning)
        itc_labels = compute_isolated_tumor_cells(
            tumor_mask=instances, threshold=(float(itc_diameter_um) + float(grow_distance_um)) / spacing
        )
    return instances, [int(v) for v in itc_labels]


def lesion_froc(
    samples: Sequence[Mapping[str, Any]],
    threshold: float = 0.5,
    candidates: str = "components",
    nms_box_size: int = 3,
    nms_sigma: float = 0.0,
    grow_distance_um: float = 75.0,
    itc_diameter_um: float = 200.0,
    eval_thresholds: Sequence[float] = CAMELYON16_FP_RATES,
) -> dict[str, Any]:
    """Camelyon16 lesion-level FROC over slides, from grid heatmaps and level-0-referenced ground-truth masks.

    Per slide (keys in :class:`FrocSampleKeys`): ``prob_map`` ``(H, W)`` with ``cell_size`` (level-0 px per cell)
    and optional ``origin``, or ready ``candidates`` ``(probs, x, y)`` in level-0 px; ``tumor_mask`` ``(h, w)``
    (non-zero = tumor) at ``mask_downsample`` (level-0 px per mask pixel, e.g. ``2**level``); ``mpp`` (level-0 µm/px).

    Composition, following :class:`monai.apps.pathology.metrics.LesionFROC` but on arrays and with any cell size
    and mask downsample (``LesionFROC`` reads files and needs both at the same power-of-two level):

    1. candidates from the heatmap (:func:`heatmap_candidates`), mapped to level-0 pixels and then to mask pixels
       by ``floor(coord / mask_downsample)`` (clipped to the mask);
    2. ground truth with MONAI's ``compute_multi_instance_mask`` / ``compute_isolated_tumor_cells`` at the mask's
       pixel size ``mpp * mask_downsample`` (:func:`prepare_froc_ground_truth`);
    3. ``monai.metrics.compute_fp_tp_probs_nd``: a candidate inside a lesion is a hit (a lesion scores its best
       hit), one on no tumor is a false positive, one inside an ITC is neither;
    4. ``compute_froc_curve_data`` over all slides and ``compute_froc_score`` at ``eval_thresholds``.

    One deliberate difference: a 0.0 entry is added to the true-positive probabilities before step 4. The
    Camelyon16 code skips the lowest probability present, assuming it is the 0.0 of a missed lesion; when every
    lesion is found that would drop a real operating point (a perfect heatmap would score 0). The extra 0.0 counts
    at no threshold, so results are unchanged whenever a lesion is missed.

    Args:
        samples: one mapping per slide, as above. Slides without tumor count towards the false positives per slide.
        threshold: candidates need ``prob > threshold`` (ignored for ``candidates`` given directly).
        candidates: ``"components"`` or ``"nms"`` (see :func:`heatmap_candidates`).
        nms_box_size: NMS box in cells.
        nms_sigma: NMS Gaussian sigma in cells.
        grow_distance_um: see :func:`prepare_froc_ground_truth`.
        itc_diameter_um: see :func:`prepare_froc_ground_truth`.
        eval_thresholds: false positives per slide at which sensitivity is averaged.

    Returns:
        ``froc`` (mean sensitivity at ``eval_thresholds``; NaN, logged, when there is no target lesion),
        ``sensitivity_at`` (``{str(fp_rate): sensitivity}``), ``fps_per_image`` and ``sensitivity`` (the curve, from
        low to high thresholds), ``num_targets``, ``num_itc`` (excluded lesions), ``num_images``, ``num_candidates``.

    Raises:
        ValueError: when ``samples`` is empty or a sample misses a key or holds a bad value (named in the message).
    """
    if len(samples) == 0:
        raise ValueError("`samples` is empty: give one mapping per slide.")
    k = FrocSampleKeys
    all_fp: list[np.ndarray] = []
    all_tp: list[np.ndarray] = [np.zeros(1, dtype=np.float64)]  # the 0.0 entry explained above
    num_targets = num_itc = num_candidates = 0
    for i, sample in enumerate(samples):
        where = f"samples[{i}]"
        for key in (k.TUMOR_MASK, k.MASK_DOWNSAMPLE, k.MPP):
            if key.value not in sample:
                raise ValueError(f"{where} has no {key.value!r}; keys given: {sorted(map(str, sample))}.")
        if k.CANDIDATES.value in sample:
            probs, x, y = (np.asarray(v, dtype=np.float64).ravel() for v in sample[k.CANDIDATES.value])
            if not probs.size == x.size == y.size:
                raise ValueError(f"{where}['candidates'] must be (probs, x, y) of equal lengths.")
        elif k.PROB_MAP.value in sample and k.CELL_SIZE.value in sample:
            probs, x, y = heatmap_candidates(
                sample[k.PROB_MAP.value],
                cell_size=sample[k.CELL_SIZE.value],
                threshold=threshold,
                mode=candidates,
                origin=sample.get(k.ORIGIN.value, (0.0, 0.0)),
                nms_box_size=nms_box_size,
                nms_sigma=nms_sigma,
            )
        else:
            raise ValueError(f"{where} needs 'prob_map' with 'cell_size', or 'candidates' as (probs, x, y).")
        downsample = _positive(sample[k.MASK_DOWNSAMPLE.value], f"{where}['mask_downsample']")
        mpp = _positive(sample[k.MPP.value], f"{where}['mpp']")
        instances, itc = prepare_froc_ground_truth(
            sample[k.TUMOR_MASK.value], downsample * mpp, grow_distance_um, itc_diameter_um
        )
        h, w = instances.shape
        rows = np.floor(y / downsample).astype(np.int64)
        cols = np.floor(x / downsample).astype(np.int64)
        outside = (rows < -1) | (rows > h) | (cols < -1) | (cols > w)
        if np.any(outside):
            logger.warning(
                "lesion_froc: %s: %d candidates lie outside the %dx%d mask (downsample %g); clipped to its border. "
                "Check 'cell_size', 'origin' and 'mask_downsample'.",
                where,
                int(outside.sum()),
                h,
                w,
                downsample,
            )
        coords = np.stack([np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)], axis=1).reshape(-1, 2)
        fp_probs, tp_probs, n_targets = compute_fp_tp_probs_nd(
            probs=probs, coords=coords, evaluation_mask=instances, labels_to_exclude=itc
        )
        all_fp.append(np.asarray(fp_probs, dtype=np.float64))
        all_tp.append(np.asarray(tp_probs, dtype=np.float64))
        num_targets += int(n_targets)
        num_itc += len(itc)
        num_candidates += int(probs.size)
    result: dict[str, Any] = {
        "froc": _NAN,
        "sensitivity_at": {str(float(t)): _NAN for t in eval_thresholds},
        "fps_per_image": [],
        "sensitivity": [],
        "num_targets": num_targets,
        "num_itc": num_itc,
        "num_images": len(samples),
        "num_candidates": num_candidates,
    }
    if num_targets == 0:
        logger.warning("lesion_froc: no target lesion in %d slides; the FROC is undefined (NaN).", len(samples))
        return result
    fps_per_image, sensitivity = compute_froc_curve_data(
        fp_probs=np.concatenate(all_fp) if all_fp else np.zeros(0),
        tp_probs=np.concatenate(all_tp),
        num_targets=num_targets,
        num_images=len(samples),
    )
    result["froc"] = float(compute_froc_score(fps_per_image, sensitivity, tuple(float(t) for t in eval_thresholds)))
    result["sensitivity_at"] = {
        str(float(t)): float(compute_froc_score(fps_per_image, sensitivity, (float(t),))) for t in eval_thresholds
    }
    result["fps_per_image"] = [float(v) for v in fps_per_image]
    result["sensitivity"] = [float(v) for v in sensitivity]
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Camelyon17 slide classes and pN-stage


def largest_tumor_diameter_um(tumor_mask: Any, pixel_size_um: float) -> float:
    """Longest diameter (µm) of the largest 8-connected tumor region of a binary map; 0.0 without tumor.

    The diameter is scikit-image's ``feret_diameter_max`` of the region (the largest distance between two points
    of its convex hull, measured on the hull's half-pixel contour) in pixels, times ``pixel_size_um``. A straight
    run of ``n`` cells measures ``n`` cells, a single cell 1 cell, a 2x2 block ``sqrt(5)`` cells.

    Args:
        tumor_mask: ``(H, W)`` boolean (or 0/1) map of tumor cells/pixels.
        pixel_size_um: microns per cell/pixel.

    Returns:
        The largest diameter over all regions, in microns.
    """
    mask = _check_binary(tumor_mask, "tumor_mask")
    size = _positive(pixel_size_um, "pixel_size_um")
    if not mask.any():
        return 0.0
    regions = regionprops(label_components(mask, connectivity=2))
    return float(max(r.feret_diameter_max for r in regions)) * size


def _classify_diameter(diameter_um: float, macro_um: float, micro_um: float) -> str:
    if diameter_um > macro_um:
        return SlideClass.MACRO.value
    if diameter_um > micro_um:
        return SlideClass.MICRO.value
    if diameter_um > 0:
        return SlideClass.ITC.value
    return SlideClass.NEGATIVE.value


def slide_class(
    prob_map: Any, cell_size_um: float, threshold: float = 0.5, macro_um: float = 2000.0, micro_um: float = 200.0
) -> str:
    """Camelyon17 slide class from a predicted tumor map, by the longest diameter of its largest tumor region.

    ``> macro_um`` (2 mm): ``"macro"``; ``> micro_um`` (0.2 mm): ``"micro"``; any other tumor: ``"itc"``; no cell
    above ``threshold``: ``"negative"``. The diameter is measured as in :func:`largest_tumor_diameter_um`; the
    Camelyon17 cell-count criterion for ITC (< 200 cells) cannot be read from a patch map and is not used.

    Args:
        prob_map: ``(H, W)`` tumor probability per grid cell (NaN = no prediction).
        cell_size_um: the side of one cell in microns (patch size in level-0 px times level-0 mpp).
        threshold: tumor where ``prob > threshold``.
        macro_um: macro-metastasis limit in microns.
        micro_um: micro-metastasis limit in microns.

    Returns:
        One of ``"macro"``, ``"micro"``, ``"itc"``, ``"negative"``.
    """
    diameter = largest_tumor_diameter_um(_predicted(prob_map, threshold), cell_size_um)
    return _classify_diameter(diameter, macro_um, micro_um)


def slide_class_from_mask(
    tumor_mask: Any, pixel_size_um: float, macro_um: float = 2000.0, micro_um: float = 200.0
) -> str:
    """Camelyon17 slide class of a ground-truth tumor mask (boolean or 0/1), as :func:`slide_class`.

    Args:
        tumor_mask: ``(H, W)`` ground-truth tumor mask; for a label grid pass ``label_grid == LABEL_TUMOR``.
        pixel_size_um: microns per mask pixel (level-0 mpp times the mask's downsample).
        macro_um: macro-metastasis limit in microns.
        micro_um: micro-metastasis limit in microns.

    Returns:
        One of ``"macro"``, ``"micro"``, ``"itc"``, ``"negative"``.
    """
    return _classify_diameter(largest_tumor_diameter_um(tumor_mask, pixel_size_um), macro_um, micro_um)


def _parse_slide_class(value: Any, index: int) -> SlideClass:
    try:
        return SlideClass(str(value).strip().lower())
    except ValueError:
        raise ValueError(
            f"`slide_classes[{index}]` must be one of {[c.value for c in SlideClass]}, got {value!r}."
        ) from None


def pn_stage(slide_classes: Sequence[str]) -> str:
    """Camelyon17 patient pN-stage from the slide classes of the patient's lymph nodes (five per patient there).

    Rules: ``pN2`` when metastases (micro or macro) are in 4 or more nodes and at least one is a macro; ``pN1`` when
    they are in 1-3 nodes with at least one macro; ``pN1mi`` with micro-metastases but no macro; ``pN0(i+)`` with
    only ITCs; ``pN0`` otherwise. (Camelyon17 has no pN3: with five nodes, 4-5 metastatic nodes are pN2.)

    Args:
        slide_classes: ``"negative"``, ``"itc"``, ``"micro"`` or ``"macro"`` per node (case-insensitive).

    Returns:
        One of ``"pN0"``, ``"pN0(i+)"``, ``"pN1mi"``, ``"pN1"``, ``"pN2"``.

    Raises:
        ValueError: on an unknown slide class.
    """
    counts = Counter(_parse_slide_class(c, i) for i, c in enumerate(slide_classes))
    macro, micro, itc = counts[SlideClass.MACRO], counts[SlideClass.MICRO], counts[SlideClass.ITC]
    if macro > 0:
        return (PNStage.PN1 if macro + micro <= 3 else PNStage.PN2).value
    if micro > 0:
        return PNStage.PN1MI.value
    if itc > 0:
        return PNStage.PN0_ITC.value
    return PNStage.PN0.value


def _stage_index(stage: Any, name: str, index: int) -> int:
    text = str(stage).strip()
    for i, known in enumerate(PN_STAGE_ORDER):
        if text.lower() == known.lower():
            return i
    raise ValueError(f"`{name}[{index}]` must be one of {list(PN_STAGE_ORDER)}, got {stage!r}.")


def quadratic_kappa(ref_stages: Sequence[str], pred_stages: Sequence[str]) -> float:
    """Quadratic-weighted Cohen's kappa of pN-stages on the ordered scale :data:`PN_STAGE_ORDER` (Camelyon17).

    Args:
        ref_stages: reference pN-stage per patient.
        pred_stages: predicted pN-stage per patient, in the same order.

    Returns:
        ``sklearn.metrics.cohen_kappa_score(..., weights="quadratic")``; NaN (logged) when undefined, e.g. when
        every patient has the same stage in both lists.

    Raises:
        ValueError: when the lengths differ, the lists are empty or a stage is unknown.
    """
    if len(ref_stages) != len(pred_stages):
        raise ValueError(
            f"`ref_stages` and `pred_stages` must have the same length, got {len(ref_stages)} and {len(pred_stages)}."
        )
    if len(ref_stages) == 0:
        raise ValueError("`ref_stages` and `pred_stages` are empty: give one stage per patient.")
    ref = [_stage_index(s, "ref_stages", i) for i, s in enumerate(ref_stages)]
    pred = [_stage_index(s, "pred_stages", i) for i, s in enumerate(pred_stages)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = float(cohen_kappa_score(ref, pred, labels=list(range(len(PN_STAGE_ORDER))), weights="quadratic"))
    if not math.isfinite(kappa):
        logger.warning("quadratic_kappa: undefined for %d patients (no spread of stages); set to NaN.", len(ref))
        return _NAN
    return kappa


# ----------------------------------------------------------------------------------------------------------------------
# map quality


def count_tumor_points(
    prob_map: Any, gt_labels_grid: Any, threshold: float = 0.5, max_size: int | None = None
) -> int:
    """Number of "tumor points": isolated predicted-tumor spots lying entirely in ground-truth normal tissue.

    The paper's qualitative complaint about classifier-only maps, made a number. Predicted tumor cells
    (``prob > threshold``, background cells ignored) are grouped into 8-connected components; a component is a
    tumor point when **every** one of its cells is ground-truth normal (so it touches no tumor and no nolabel cell)
    and, if ``max_size`` is given, it has at most ``max_size`` cells.

    Args:
        prob_map: ``(H, W)`` tumor probability per cell.
        gt_labels_grid: ``(H, W)`` int labels: 1 tumor, 0 normal, -1 nolabel, -2 background.
        threshold: tumor where ``prob > threshold``.
        max_size: largest component (in cells) still counted as a point; ``None`` counts every size.

    Returns:
        The number of tumor points.

    Raises:
        ValueError: when the shapes differ.
    """
    labels = _as_2d(gt_labels_grid, "gt_labels_grid")
    pred = _predicted(prob_map, threshold)
    if pred.shape != labels.shape:
        raise ValueError(f"`prob_map` {pred.shape} and `gt_labels_grid` {labels.shape} must have the same shape.")
    pred &= labels != LABEL_BACKGROUND
    components = label_components(pred, connectivity=2)
    if components.max(initial=0) == 0:
        return 0
    count = 0
    for region in regionprops(components):
        cells = labels[region.coords[:, 0], region.coords[:, 1]]
        if np.all(cells == LABEL_NORMAL) and (max_size is None or region.area <= max_size):
            count += 1
    return count


def dice(prob_map: Any, gt_tumor_grid: Any, threshold: float = 0.5, valid: Any = None) -> float:
    """Dice overlap ``2|P & G| / (|P| + |G|)`` of the predicted tumor map and a ground-truth tumor grid.

    Args:
        prob_map: ``(H, W)`` tumor probability per cell.
        gt_tumor_grid: ``(H, W)`` boolean or 0/1 ground-truth tumor (``label_grid == LABEL_TUMOR``).
        threshold: tumor where ``prob > threshold``.
        valid: optional ``(H, W)`` boolean; only these cells count (e.g. ``label_grid >= 0``).

    Returns:
        The Dice coefficient; NaN (logged at debug level) when both masks are empty on the valid cells.

    Raises:
        ValueError: when the shapes differ or ``gt_tumor_grid`` is not binary.
    """
    pred = _predicted(prob_map, threshold)
    gt = _check_binary(gt_tumor_grid, "gt_tumor_grid")
    if pred.shape != gt.shape:
        raise ValueError(f"`prob_map` {pred.shape} and `gt_tumor_grid` {gt.shape} must have the same shape.")
    if valid is not None:
        keep = _check_binary(valid, "valid")
        if keep.shape != gt.shape:
            raise ValueError(f"`valid` {keep.shape} must have the shape of `gt_tumor_grid` {gt.shape}.")
        pred, gt = pred & keep, gt & keep
    denominator = int(pred.sum()) + int(gt.sum())
    if denominator == 0:
        logger.debug("dice: prediction and ground truth are both empty; Dice is undefined (NaN).")
        return _NAN
    return 2.0 * int(np.sum(pred & gt)) / denominator


# ----------------------------------------------------------------------------------------------------------------------
# per slide and over slides


def evaluate_slide(
    prob_grid: Any,
    label_grid: Any,
    cell_size_um: float,
    threshold: float = 0.5,
    slide_label: int | None = None,
    max_point_size: int | None = None,
    keep_patches: bool = True,
) -> dict[str, Any]:
    """All per-slide numbers from a grid of tumor probabilities and the grid of ground-truth labels.

    Background cells (label -2) are not patches: they are ignored by every number here, including the predicted
    slide class and the slide score.

    Args:
        prob_grid: ``(H, W)`` tumor probability per cell.
        label_grid: ``(H, W)`` int labels: 1 tumor, 0 normal, -1 nolabel, -2 background.
        cell_size_um: side of one cell in microns.
        threshold: tumor where ``prob > threshold``.
        slide_label: 1 if the slide has tumor, 0 if not; ``None`` takes 1 when any cell is labelled tumor (a slide
            whose only tumor is in nolabel cells then counts as normal: pass the reference label when known).
        max_point_size: ``max_size`` of :func:`count_tumor_points`.
        keep_patches: add ``PATCHES_KEY`` with the evaluated patches' ``probs`` and ``labels`` (lists), which
            :func:`summarize` needs for pooled AUCs.

    Returns:
        A flat dict: the :func:`patch_metrics` keys, ``dice`` (on tumor/normal cells), ``tumor_points``,
        ``slide_score`` (the maximum probability over tissue cells; None for a slide without tissue cells),
        ``status`` (``ok`` or ``no_tissue``), ``slide_label``, ``pred_class``, ``gt_class``, ``pred_diameter_um``,
        ``gt_diameter_um``, ``threshold``, and ``PATCHES_KEY`` if asked.

    Raises:
        ValueError: when the grids' shapes differ or a label is unknown.
    """
    probs = _as_2d(prob_grid, "prob_grid").astype(np.float64)
    labels = _as_2d(label_grid, "label_grid")
    if probs.shape != labels.shape:
        raise ValueError(f"`prob_grid` {probs.shape} and `label_grid` {labels.shape} must have the same shape.")
    out: dict[str, Any] = dict(patch_metrics(probs, labels, threshold))
    tissue = labels != LABEL_BACKGROUND
    tumor = labels == LABEL_TUMOR
    tissue_probs = np.where(tissue, probs, np.nan)
    out["dice"] = dice(probs, tumor, threshold, valid=labels >= 0)
    out["tumor_points"] = count_tumor_points(probs, labels, threshold, max_size=max_point_size)
    finite = tissue_probs[np.isfinite(tissue_probs)]
    # no tissue: no score (not a confident 0.0), and the slide is left out of the slide AUC
    out["slide_score"] = float(finite.max()) if finite.size else None
    out["status"] = "ok" if finite.size else "no_tissue"
    out["slide_label"] = int(tumor.any()) if slide_label is None else int(slide_label)
    out["pred_diameter_um"] = largest_tumor_diameter_um(_predicted(tissue_probs, threshold), cell_size_um)
    out["gt_diameter_um"] = largest_tumor_diameter_um(tumor, cell_size_um)
    out["pred_class"] = slide_class(tissue_probs, cell_size_um, threshold)
    out["gt_class"] = slide_class_from_mask(tumor, cell_size_um)
    out["threshold"] = float(threshold)
    if keep_patches:
        keep = (labels == LABEL_TUMOR) | (labels == LABEL_NORMAL)
        out[PATCHES_KEY] = {"probs": probs[keep].tolist(), "labels": labels[keep].astype(int).tolist()}
    return out


_MEAN_KEYS = ("accuracy", "pr_auc", "roc_auc", "dice", "tumor_points")


def summarize(per_slide: Sequence[Mapping[str, Any]], threshold: float | None = None) -> dict[str, Any]:
    """Numbers over slides from :func:`evaluate_slide` results.

    Args:
        per_slide: the per-slide dicts.
        threshold: threshold of the pooled accuracy; ``None`` takes the slides' ``threshold`` (else 0.5).

    Returns:
        A flat dict: ``n_slides``; ``pooled_*`` (:func:`patch_metrics` over all patches of all slides; the AUCs need
        every slide's ``PATCHES_KEY``, else they are NaN and the accuracy comes from the slides' counts);
        ``mean_*`` (mean over slides of accuracy, pr_auc, roc_auc, dice, tumor_points, ignoring NaN);
        ``slide_auc`` (:func:`slide_auc` of ``slide_score`` over the slides that have one); ``n_no_tissue`` (slides
        without a score: no tissue cell); ``slide_class_agreement`` (fraction of slides whose
        predicted class equals the ground-truth class).

    Raises:
        ValueError: when ``per_slide`` is empty.
    """
    if len(per_slide) == 0:
        raise ValueError("`per_slide` is empty: give one evaluate_slide() result per slide.")
    if threshold is None:
        threshold = float(per_slide[0].get("threshold", 0.5))
    out: dict[str, Any] = {"n_slides": len(per_slide)}
    if all(PATCHES_KEY in s for s in per_slide):
        probs = np.concatenate([np.asarray(s[PATCHES_KEY]["probs"], dtype=np.float64) for s in per_slide])
        labels = np.concatenate([np.asarray(s[PATCHES_KEY]["labels"], dtype=np.int64) for s in per_slide])
        pooled = patch_metrics(probs, labels, threshold)
    else:
        logger.warning("summarize: some slides lack %r; pooled PR-AUC and ROC-AUC are NaN.", PATCHES_KEY)
        n = sum(int(s["n"]) for s in per_slide)
        correct = sum(int(s["n_correct"]) for s in per_slide)
        n_tumor = sum(int(s["n_tumor"]) for s in per_slide)
        pooled = {
            "accuracy": correct / n if n else _NAN,
            "pr_auc": _NAN,
            "roc_auc": _NAN,
            "n": n,
            "n_tumor": n_tumor,
            "n_normal": n - n_tumor,
            "n_correct": correct,
        }
    out.update({f"pooled_{key}": value for key, value in pooled.items()})
    for key in _MEAN_KEYS:
        out[f"mean_{key}"] = _nanmean([s.get(key, _NAN) for s in per_slide])
    if all("slide_score" in s and "slide_label" in s for s in per_slide):
        scored = [s for s in per_slide if s["slide_score"] is not None]
        out["slide_auc"] = slide_auc([s["slide_score"] for s in scored], [s["slide_label"] for s in scored]) \
            if scored else _NAN
    else:
        out["slide_auc"] = _NAN
    out["n_no_tissue"] = sum(s.get("slide_score", 0.0) is None for s in per_slide)
    if all("pred_class" in s and "gt_class" in s for s in per_slide):
        out["slide_class_agreement"] = float(np.mean([s["pred_class"] == s["gt_class"] for s in per_slide]))
    else:
        out["slide_class_agreement"] = _NAN
    return out
