"""Slide-level predictions on disk and their metrics: the common output of every slide-level method.

A slide-level method (the slide CNN of :mod:`~monai_wsi_ext.slidecls.cnn`, the heatmap aggregation of
:mod:`~monai_wsi_ext.slidecls.aggregate`, the gate of the hierarchical pipeline) writes one JSON file,
``slide_scores.json`` by default::

    {"method": "slide_cnn", "threshold": 0.5, "classes": ["no_tumor", "tumor"],
     "slides": {"test_000": {"score": 0.93, "pred": 1, "probs": [0.07, 0.93]}, ...}, ...}

``score`` is the probability that the slide has tumor (for the Camelyon17 classes: one minus the probability of
``negative``), ``pred`` the predicted class index (1 = tumor for the binary classes). ``evaluate.json``
(``slide_predictions``) reads these files and reports each method's slide ROC-AUC and accuracy next to the
heatmap's own (:func:`slide_score_metrics`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.evaluation import metrics as M
from monai_wsi_ext.io.atomic import write_json_atomic

__all__ = ["SLIDE_SCORES_NAME", "SlideScores", "write_slide_scores", "read_slide_scores", "find_slide_scores",
           "slide_score_metrics"]

#: default file name of a method's slide-level predictions
SLIDE_SCORES_NAME = "slide_scores.json"


@dataclass
class SlideScores:
    """One method's slide-level predictions.

    Attributes:
        method: the method's name (the key of its row in the evaluation).
        scores: slide id -> probability of tumor.
        threshold: tumor where ``score > threshold``.
        preds: slide id -> predicted class index (binary: 1 tumor); defaults to ``score > threshold``.
        classes: class names of ``preds``.
        path: the file read.
        extra: the file's other top-level keys.
    """

    method: str
    scores: dict[str, float]
    threshold: float = 0.5
    preds: dict[str, int] = field(default_factory=dict)
    classes: list[str] = field(default_factory=lambda: ["no_tumor", "tumor"])
    path: str | None = None
    extra: dict = field(default_factory=dict)


def write_slide_scores(path: str | os.PathLike, method: str, slides: Mapping[str, Mapping[str, Any]],
                       threshold: float = 0.5, classes: Sequence[str] = ("no_tumor", "tumor"),
                       **extra: Any) -> Path:
    """Write a method's slide-level predictions atomically.

    Args:
        path: the JSON file.
        method: the method's name.
        slides: slide id -> ``{"score": P(tumor), "pred": class index, ...}`` (further keys are kept).
        threshold: the method's decision threshold on ``score``.
        classes: class names of ``pred``.
        extra: further top-level keys (model, settings, timings).

    Raises:
        ConfigError: a slide without a finite score in [0, 1].
    """
    for sid, entry in slides.items():
        s = entry.get("score")
        if s is None or not math.isfinite(float(s)) or not 0.0 <= float(s) <= 1.0:
            raise ConfigError(f"write_slide_scores: slide {sid!r} of {method!r} has no score in [0, 1] ({s!r}).")
    doc = {"method": str(method), "threshold": float(threshold), "classes": list(classes),
           "slides": {str(k): dict(v) for k, v in sorted(slides.items())}, **extra}
    return write_json_atomic(path, doc)


def read_slide_scores(path: str | os.PathLike) -> SlideScores:
    """Read a file written by :func:`write_slide_scores`.

    Raises:
        MonaiWsiExtError: the file is missing, not JSON, or not in this format (named in the message).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MonaiWsiExtError(f"{path}: cannot read slide scores ({type(e).__name__}: {e}).") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("slides"), dict) or "method" not in doc:
        raise MonaiWsiExtError(f"{path}: not a slide-scores file (needs 'method' and a 'slides' object, as "
                               "monai_wsi_ext.slidecls.scores.write_slide_scores writes).")
    threshold = float(doc.get("threshold", 0.5))
    scores, preds = {}, {}
    for sid, entry in doc["slides"].items():
        if not isinstance(entry, dict) or entry.get("score") is None:
            raise MonaiWsiExtError(f"{path}: slide {sid!r} has no 'score'.")
        scores[str(sid)] = float(entry["score"])
        preds[str(sid)] = int(entry.get("pred", int(float(entry["score"]) > threshold)))
    extra = {k: v for k, v in doc.items() if k not in ("method", "threshold", "classes", "slides")}
    return SlideScores(str(doc["method"]), scores, threshold, preds, list(doc.get("classes", ["no_tumor", "tumor"])),
                       str(path), extra)


def find_slide_scores(paths: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[SlideScores]:
    """The slide-score files named by ``paths``: files, or folders whose ``slide_scores*.json`` are all read.

    Raises:
        MonaiWsiExtError: a path that does not exist, a folder without such a file, or two files of one method.
    """
    if paths is None:
        return []
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[SlideScores] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.glob("slide_scores*.json"))
            if not files:
                raise MonaiWsiExtError(f"{p}: no slide_scores*.json in this folder (slide_predictions).")
        elif p.is_file():
            files = [p]
        else:
            raise MonaiWsiExtError(f"slide_predictions: {str(p)!r} does not exist.")
        out.extend(read_slide_scores(f) for f in files)
    names = [s.method for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MonaiWsiExtError(f"slide_predictions: method(s) {dup} given by more than one file "
                               f"({[s.path for s in out if s.method in dup]}).")
    return out


def slide_score_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5,
                        preds: Sequence[int] | None = None) -> dict[str, Any]:
    """Slide-level numbers of one method: ROC-AUC of the score, accuracy, sensitivity and specificity of the call.

    Args:
        scores: per slide, the probability of tumor.
        labels: per slide, 1 with tumor, 0 without.
        threshold: tumor where ``score > threshold`` (when ``preds`` is None).
        preds: per slide the call (non-zero = tumor) instead of the threshold.

    Returns:
        ``n``, ``n_tumor``, ``roc_auc`` (NaN with one class), ``accuracy``, ``sensitivity`` (NaN without tumor
        slides), ``specificity`` (NaN without tumor-free slides), ``threshold``.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, np.int64).ravel()
    call = (s > float(threshold)) if preds is None else (np.asarray(preds).ravel() != 0)
    n, pos = int(y.size), int((y == 1).sum())
    out: dict[str, Any] = {"n": n, "n_tumor": pos, "threshold": float(threshold)}
    out["roc_auc"] = M.slide_auc(s, y) if n else float("nan")
    out["accuracy"] = float((call == (y == 1)).mean()) if n else float("nan")
    out["sensitivity"] = float(call[y == 1].mean()) if pos else float("nan")
    out["specificity"] = float((~call[y == 0]).mean()) if n - pos else float("nan")
    return out
