"""Operating threshold and probability calibration chosen on validation slides.

Every accuracy, tumor-point count and Dice of the evaluation is taken at one threshold (``prob > threshold``,
0.5 by default). A model's probabilities need not be calibrated, and 0.5 need not be its best cut; choosing the
cut on the **test** slides would be an oracle. :func:`fit_calibration` chooses it on the labelled patches of
heatmaps predicted for the **validation** slides and writes ``calibration.json``:

* ``threshold``: the cut that maximises the ``criterion`` on the validation patches: ``accuracy`` (patch accuracy,
  the measure the tables report) or ``balanced_accuracy`` (sensitivity + specificity over 2; Youden's J); among
  equally good cuts the one nearest 0.5;
* ``platt``: Platt scaling (``p' = sigmoid(a * logit(p) + b)``, fitted by maximum likelihood on the same patches),
  with ``platt_threshold``, the raw probability whose calibrated value is 0.5, and the expected calibration error
  (10 equal-width bins) before and after, on validation.

``evaluate.json`` and ``inference.json`` take the file as ``calibration``: its threshold then replaces
``threshold`` (evaluation metrics; the inference's tumor regions, outline and binary DICOM SEG), see
:func:`threshold_of`. The probabilities in the heatmaps stay the model's own; :func:`apply_platt` maps them.

Example (bundle commands)::

    python -m monai.bundle run --config_file "['bundle/configs/common.json','bundle/configs/inference.json']" \
        --split validation --heatmap_dir runs/val_heatmaps
    python -m monai.bundle run --config_file "['bundle/configs/common.json','bundle/configs/calibrate.json']" \
        --heatmap_dir runs/val_heatmaps
    python -m monai.bundle run --config_file "['bundle/configs/common.json','bundle/configs/evaluate.json']" \
        --calibration runs/val_heatmaps/calibration.json
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.labels import LABEL_NORMAL, LABEL_TUMOR

__all__ = ["CRITERIA", "check_criterion", "choose_threshold", "fit_platt", "apply_platt", "expected_calibration_error",
           "fit_calibration", "load_calibration", "threshold_of", "HeatmapCalibrator", "CALIBRATION_FILE"]

logger = logging.getLogger(__name__)

CRITERIA = ("accuracy", "balanced_accuracy")
"""What :func:`choose_threshold` maximises."""

CALIBRATION_FILE = "calibration.json"
"""File name :class:`HeatmapCalibrator` writes by default (in the validation heatmap folder)."""

_EPS = 1e-6


def check_criterion(criterion: str) -> str:
    """``criterion`` when it is one of :data:`CRITERIA`.

    Raises:
        ConfigError: any other value.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"calibration criterion {criterion!r} is not one of {list(CRITERIA)}.")
    return criterion


def _check_pairs(probs: Any, labels: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise MonaiWsiExtError(f"{where}: {p.size} probabilities but {y.size} labels.")
    if not np.all(np.isfinite(p)):
        raise MonaiWsiExtError(f"{where}: {int((~np.isfinite(p)).sum())} labelled patches have no finite probability.")
    bad = ~np.isin(y, (LABEL_NORMAL, LABEL_TUMOR))
    if bad.any():
        raise MonaiWsiExtError(f"{where}: labels must be {LABEL_TUMOR} (tumor) or {LABEL_NORMAL} (normal); "
                               f"got {sorted(set(np.unique(y[bad]).tolist()))[:5]}.")
    y = (y == LABEL_TUMOR).astype(np.int64)
    n_tumor = int(y.sum())
    if n_tumor == 0 or n_tumor == y.size:
        raise MonaiWsiExtError(f"{where}: a threshold needs tumor and normal patches; got {n_tumor} tumor of {y.size} "
                               "labelled patches. Calibrate on validation slides that have both.")
    return p, y


def choose_threshold(probs: Any, labels: Any, criterion: str = "accuracy", where: str = "calibration") -> float:
    """The cut ``t`` (tumor where ``prob > t``) that maximises ``criterion`` on labelled patches.

    Only cuts between distinct probability values differ, so the candidates are the midpoints between
    consecutive distinct values, plus one below the smallest and the largest value itself; among equally
    good cuts the one nearest 0.5 wins (the default stays when the data cannot tell).

    Args:
        probs: tumor probabilities of labelled patches.
        labels: 1 tumor, 0 normal (the grid labels of labelled patches).
        criterion: ``accuracy`` or ``balanced_accuracy``.
        where: names the data in error messages.

    Returns:
        The threshold.

    Raises:
        ConfigError: unknown criterion.
        MonaiWsiExtError: sizes differ, a probability is not finite, or only one class is present.
    """
    check_criterion(criterion)
    p, y = _check_pairs(probs, labels, where)
    values, inverse = np.unique(p, return_inverse=True)
    tumor_at = np.bincount(inverse, weights=y, minlength=values.size)
    count_at = np.bincount(inverse, minlength=values.size).astype(np.float64)
    # calling tumor every value above cut index k (k = -1: everything); suffix sums give TP and predicted positives
    tp = np.concatenate([np.cumsum(tumor_at[::-1])[::-1], [0.0]])
    pos = np.concatenate([np.cumsum(count_at[::-1])[::-1], [0.0]])
    n_t, n = float(y.sum()), float(y.size)
    fp = pos - tp
    tn = (n - n_t) - fp
    if criterion == "accuracy":
        score = (tp + tn) / n
    else:
        score = 0.5 * (tp / n_t + tn / (n - n_t))
    # cut j calls tumor the values[j:], i.e. t between values[j-1] and values[j]
    cuts = np.empty(values.size + 1)
    cuts[0] = values[0] - max(1e-6, abs(values[0]) * 1e-6)
    cuts[1:-1] = 0.5 * (values[:-1] + values[1:])
    cuts[-1] = values[-1]
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def fit_platt(probs: Any, labels: Any, where: str = "calibration", iterations: int = 100) -> tuple[float, float]:
    """Platt scaling on the logit: ``a, b`` maximising the likelihood of ``sigmoid(a * logit(p) + b)``.

    Newton's method on the two parameters with a small ridge (``1e-6``) so that separable data stays finite.

    Returns:
        ``(a, b)``.
    """
    p, y = _check_pairs(probs, labels, where)
    x = _logit(p)
    design = np.stack([x, np.ones_like(x)], axis=1)
    w = np.zeros(2)
    w[0] = 1.0
    for _ in range(int(iterations)):
        z = design @ w
        q = 1.0 / (1.0 + np.exp(-z))
        grad = design.T @ (q - y) + 1e-6 * w
        hess = (design * (q * (1 - q))[:, None]).T @ design + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


def apply_platt(probs: Any, a: float, b: float) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(a * logit(p) + b)``; NaN (background) stays NaN."""
    p = np.asarray(probs, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    out[ok] = 1.0 / (1.0 + np.exp(-(a * _logit(p[ok]) + b)))
    return out


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    """Expected calibration error: over ``bins`` equal-width probability bins, the patch-weighted mean of
    ``|mean probability - tumor fraction|``."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(p[sel].mean() - y[sel].mean())
    return float(total / max(p.size, 1))


def _labelled_patches(heatmap_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from monai_wsi_ext.evaluation.report import load_heatmap_dir

    probs, labels, ids = [], [], []
    for s in load_heatmap_dir(heatmap_dir):
        keep = (s.labels == LABEL_TUMOR) | (s.labels == LABEL_NORMAL)
        probs.append(s.prob[keep])
        labels.append((s.labels[keep] == LABEL_TUMOR).astype(np.int64))
        ids.append(s.slide_id)
    return np.concatenate(probs), np.concatenate(labels), ids


def fit_calibration(heatmap_dir: str | os.PathLike, output: str | os.PathLike | None = None,
                    criterion: str = "accuracy") -> dict[str, Any]:
    """Choose the threshold and fit Platt scaling on the labelled patches of a validation heatmap folder.

    Args:
        heatmap_dir: heatmaps of the validation slides (``inference.json`` with ``split`` ``validation`` on a
            prepared folder, so every slide has its ``<id>_labels.npy``).
        output: the JSON written (None: ``<heatmap_dir>/calibration.json``).
        criterion: ``accuracy`` or ``balanced_accuracy``.

    Returns:
        The calibration record (also written): ``threshold``, ``criterion``, ``platt`` (``a``, ``b``),
        ``platt_threshold``, validation ``accuracy_at_0.5`` / ``accuracy_at_threshold`` / ``balanced_accuracy_*``,
        ``ece`` / ``ece_platt``, ``n_patches``, ``n_tumor``, ``slides``, ``heatmap_dir``.

    Raises:
        MonaiWsiExtError: no heatmap, a slide without labels (every patch nolabel), or one class only.
    """
    from monai_wsi_ext.io.atomic import write_json_atomic

    where = f"heatmap_dir {str(heatmap_dir)!r}"
    p, y, ids = _labelled_patches(heatmap_dir)
    t = choose_threshold(p, y, criterion, where=where)
    a, b = fit_platt(p, y, where=where)
    platt_t = float(1.0 / (1.0 + math.exp(b / a))) if abs(a) > 1e-12 else float("nan")

    def acc(cut: float) -> float:
        return float(np.mean((p > cut) == (y == 1)))

    def bal(cut: float) -> float:
        call = p > cut
        return float(0.5 * (call[y == 1].mean() + (~call[y == 0]).mean()))

    record = {"threshold": t, "criterion": criterion, "platt": {"a": a, "b": b}, "platt_threshold": platt_t,
              "accuracy_at_0.5": acc(0.5), "accuracy_at_threshold": acc(t),
              "balanced_accuracy_at_0.5": bal(0.5), "balanced_accuracy_at_threshold": bal(t),
              "ece": expected_calibration_error(p, y), "ece_platt": expected_calibration_error(apply_platt(p, a, b), y),
              "n_patches": int(y.size), "n_tumor": int(y.sum()), "slides": ids, "heatmap_dir": str(heatmap_dir)}
    out = Path(output) if output else Path(heatmap_dir) / CALIBRATION_FILE
    write_json_atomic(out, record)
    logger.info("calibration on %d validation patches (%d tumor, %d slides): threshold %.4f by %s (accuracy %.4f, "
                "at 0.5 %.4f), Platt a=%.3f b=%.3f -> %s", y.size, int(y.sum()), len(ids), t, criterion,
                record["accuracy_at_threshold"], record["accuracy_at_0.5"], a, b, out)
    return record


def load_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``calibration.json``; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise MonaiWsiExtError(f"calibration {str(path)!r} does not exist; write it with calibrate.json on "
                               "validation heatmaps.")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MonaiWsiExtError(f"calibration {str(path)!r} is not readable JSON: {e}") from e
    t = record.get("threshold") if isinstance(record, Mapping) else None
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        raise MonaiWsiExtError(f"calibration {str(path)!r} has no finite `threshold`.")
    return dict(record)


def threshold_of(threshold: float, calibration: str | os.PathLike | None = None) -> float:
    """The threshold a config uses: ``calibration``'s when a file is named (logged), else ``threshold``."""
    if calibration in (None, ""):
        return float(threshold)
    t = float(load_calibration(calibration)["threshold"])
    logger.info("threshold %.4f from %s (instead of %g)", t, calibration, float(threshold))
    return t


class HeatmapCalibrator:
    """``calibrate.json``'s runner: :func:`fit_calibration` on one validation heatmap folder."""

    def __init__(self, heatmap_dir: str, output: str | None = None, criterion: str = "accuracy"):
        check_criterion(criterion)
        self.heatmap_dir, self.output, self.criterion = heatmap_dir, output, criterion

    def run(self) -> dict[str, Any]:
        return fit_calibration(self.heatmap_dir, self.output, self.criterion)
