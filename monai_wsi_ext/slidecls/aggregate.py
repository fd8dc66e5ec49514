"""Heatmap aggregation: any tumor heatmap -> a slide-level call (the review's second slide-level workflow).

The patches of a slide are classified one by one (the canvas method, the patch classifier, the tile U-Net's
per-cell means: any folder ``evaluate.json`` reads), and the slide's call comes from features of its heatmap, as
the Camelyon16 winners did (:func:`heatmap_features`):

* ``max``: the highest cell probability on tissue;
* ``topk_mean``: the mean of the ``top_k`` highest (one confident cell is less convincing than ten);
* ``tumor_fraction``: the share of tissue cells above ``threshold``;
* ``largest_region_mm2``: the area of the largest 8-connected region above ``threshold``, in mm² (in cells when
  the mpp is unknown).

:class:`HeatmapAggregator` learns the call from these features on slides with known labels, normally the
validation slides (a logistic regression on standardised features, or a small random forest), and applies it to
other slides. :class:`HeatmapAggregation` is the bundle component (``aggregate_heatmaps.json``): fit on
``val_heatmap_dir``, predict ``heatmap_dir``, write ``slide_scores_aggregation.json``
(:mod:`~monai_wsi_ext.slidecls.scores`), which ``evaluate.json`` reports next to the heatmap's own slide score.

The fitted model is saved with ``joblib`` (scikit-learn's format: load only files you made yourself).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.evaluation.report import SlideHeatmap, find_truth, load_heatmap_dir, load_truth_mask
from monai_wsi_ext.io.atomic import atomic_path
from monai_wsi_ext.labels import LABEL_BACKGROUND, LABEL_TUMOR
from monai_wsi_ext.slidecls.scores import write_slide_scores

__all__ = ["FEATURES", "AGGREGATOR_MODELS", "heatmap_features", "feature_matrix", "heatmap_slide_labels",
           "HeatmapAggregator", "HeatmapAggregation"]

logger = logging.getLogger(__name__)

#: the aggregation features, in column order
FEATURES = ("max", "topk_mean", "tumor_fraction", "largest_region_mm2")
#: the learned models of :class:`HeatmapAggregator`
AGGREGATOR_MODELS = ("logistic", "random_forest")
_EIGHT = np.ones((3, 3), bool)


def heatmap_features(prob: np.ndarray, cell_um: float | None = None, threshold: float = 0.5, top_k: int = 10,
                     labels: np.ndarray | None = None) -> dict[str, float]:
    """The aggregation features of one heatmap.

    Args:
        prob: ``(H, W)`` tumor probability per cell, NaN off tissue.
        cell_um: side of a cell in µm (None: areas in cells).
        threshold: tumor where ``prob > threshold``.
        top_k: cells averaged by ``topk_mean`` (all cells when fewer).
        labels: the grid labels; background cells (-2) are not tissue.

    Returns:
        ``{feature: value}`` for :data:`FEATURES`; a slide without tissue cells has every feature 0.
    """
    p = np.asarray(prob, np.float64)
    tissue = np.isfinite(p)
    if labels is not None:
        tissue &= np.asarray(labels) != LABEL_BACKGROUND
    values = p[tissue]
    if values.size == 0:
        return {k: 0.0 for k in FEATURES}
    k = max(1, min(int(top_k), values.size))
    top = np.partition(values, values.size - k)[values.size - k:]
    tumor = tissue & (np.where(tissue, p, 0.0) > float(threshold))
    largest = 0
    if tumor.any():
        lab, n = ndimage.label(tumor, structure=_EIGHT)
        largest = int(np.bincount(lab.ravel())[1:].max())
    area = float(largest) * (float(cell_um) ** 2 / 1e6 if cell_um else 1.0)
    return {"max": float(values.max()), "topk_mean": float(top.mean()),
            "tumor_fraction": float(tumor.sum() / values.size), "largest_region_mm2": area}


def feature_matrix(slides: Sequence[SlideHeatmap], threshold: float = 0.5, top_k: int = 10,
                   mpp: float | None = None) -> np.ndarray:
    """``(n_slides, len(FEATURES))`` features of heatmap-folder slides (the cell size in µm from each record's mpp,
    else ``mpp``)."""
    rows = []
    for s in slides:
        m = s.mpp or mpp
        f = heatmap_features(s.prob, s.cell_size * m if m else None, threshold, top_k, s.labels)
        rows.append([f[k] for k in FEATURES])
    return np.asarray(rows, np.float64).reshape(-1, len(FEATURES))


def heatmap_slide_labels(slides: Sequence[SlideHeatmap], truth: str | os.PathLike | Mapping[str, str] | None = None,
                         mask_downsample: float = 32.0, missing_truth: str = "grid") -> np.ndarray:
    """Slide labels (1 tumor, 0 none) of heatmap-folder slides: from each slide's truth file when ``truth`` is given
    (:func:`~monai_wsi_ext.evaluation.report.find_truth`), else from its label grid (a cell labelled tumor).

    Args:
        slides: the slides.
        truth: truth folder / manifest / mapping, or None.
        mask_downsample: see :func:`~monai_wsi_ext.evaluation.report.load_truth_mask`.
        missing_truth: a slide without a truth file is labelled from its ``grid``, as ``negative``, or is an
            ``error``.

    Raises:
        MonaiWsiExtError: ``missing_truth="error"`` and a slide has no truth file.
    """
    cache: dict = {}
    out = []
    for s in slides:
        path = find_truth(s.slide_id, truth, cache) if truth is not None else None
        if path is not None:
            out.append(int(load_truth_mask(path, s.slide_size, mask_downsample).tumor.any()))
        elif truth is not None and missing_truth == "negative":
            out.append(0)
        elif truth is not None and missing_truth == "error":
            raise MonaiWsiExtError(f"{s.slide_id}: no truth file in {truth!r}.")
        else:
            out.append(int((s.labels == LABEL_TUMOR).any()))
    return np.asarray(out, np.int64)


class HeatmapAggregator:
    """Slide call from heatmap features (:data:`FEATURES`), learned on labelled slides.

    Args:
        model: ``logistic`` (standardised features, logistic regression with balanced class weights) or
            ``random_forest`` (``n_estimators`` trees of depth at most ``max_depth``, balanced class weights).
        threshold: the heatmap's tumor threshold of ``tumor_fraction`` and ``largest_region_mm2``.
        top_k: cells of ``topk_mean``.
        n_estimators, max_depth: the random forest's size.
        C: inverse regularisation of the logistic regression.
        seed: random state of the forest.
    """

    def __init__(self, model: str = "logistic", threshold: float = 0.5, top_k: int = 10, n_estimators: int = 100,
                 max_depth: int | None = 3, C: float = 1.0, seed: int = 0):
        if model not in AGGREGATOR_MODELS:
            raise ConfigError(f"`aggregator` must be one of {AGGREGATOR_MODELS}, got {model!r}.")
        self.model, self.threshold, self.top_k = model, float(threshold), int(top_k)
        self.n_estimators, self.max_depth, self.C, self.seed = int(n_estimators), max_depth, float(C), int(seed)
        self.pipeline = None
        self.n_fit: dict[str, int] = {}

    def _make(self):
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.model == "logistic":
            return make_pipeline(StandardScaler(), LogisticRegression(C=self.C, class_weight="balanced"))
        return RandomForestClassifier(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                      class_weight="balanced", random_state=self.seed)

    def fit(self, features: np.ndarray, labels: Sequence[int]) -> HeatmapAggregator:
        """Learn from ``(n, len(FEATURES))`` features and 0/1 labels.

        Raises:
            MonaiWsiExtError: fewer than two slides of either class.
        """
        y = np.asarray(labels, np.int64).ravel()
        x = np.asarray(features, np.float64).reshape(len(y), -1)
        counts = {int(c): int((y == c).sum()) for c in (0, 1)}
        if min(counts.values()) < 1 or len(y) < 3:
            raise MonaiWsiExtError(f"the heatmap aggregator needs slides of both classes to learn from, got "
                                   f"{counts[1]} tumor and {counts[0]} tumor-free slide(s); give more validation "
                                   "slides (val_heatmap_dir).")
        self.pipeline = self._make().fit(x, y)
        self.n_fit = {"tumor": counts[1], "no_tumor": counts[0]}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(tumor) per slide."""
        if self.pipeline is None:
            raise MonaiWsiExtError("the heatmap aggregator is not fitted (fit it or load a fitted one).")
        x = np.asarray(features, np.float64).reshape(-1, len(FEATURES))
        return self.pipeline.predict_proba(x)[:, 1]

    def fit_slides(self, slides: Sequence[SlideHeatmap], labels: Sequence[int], mpp: float | None = None):
        return self.fit(feature_matrix(slides, self.threshold, self.top_k, mpp), labels)

    def predict_slides(self, slides: Sequence[SlideHeatmap], mpp: float | None = None) -> np.ndarray:
        return self.predict_proba(feature_matrix(slides, self.threshold, self.top_k, mpp))

    def describe(self) -> dict[str, Any]:
        """Settings and, for the logistic regression, the coefficients (standardised features)."""
        out: dict[str, Any] = {"model": self.model, "features": list(FEATURES), "threshold": self.threshold,
                               "top_k": self.top_k, "fitted_on": self.n_fit}
        if self.pipeline is not None and self.model == "logistic":
            lr = self.pipeline[-1]
            out["coefficients"] = dict(zip(FEATURES, (round(float(c), 4) for c in lr.coef_[0])))
        elif self.pipeline is not None:
            out["importances"] = dict(zip(FEATURES, (round(float(c), 4) for c in self.pipeline.feature_importances_)))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Save (joblib) atomically."""
        import joblib

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            joblib.dump({"settings": self.describe(), "state": self.__dict__}, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeatmapAggregator:
        """Load a file written by :meth:`save`.

        Raises:
            ConfigError: the file is missing or not an aggregator.
        """
        import joblib

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"heatmap aggregator {str(path)!r} not found (fit it first: aggregate_heatmaps.json "
                              "with val_heatmap_dir).")
        doc = joblib.load(path)
        if not isinstance(doc, dict) or "state" not in doc:
            raise ConfigError(f"{path}: not a heatmap aggregator file.")
        obj = cls.__new__(cls)
        obj.__dict__.update(doc["state"])
        return obj


class HeatmapAggregation:
    """``aggregate_heatmaps.json``'s component: fit a :class:`HeatmapAggregator` on the validation heatmaps (when
    ``fit`` or when no fitted model exists), then score the heatmaps of ``heatmap_dir`` into a slide-scores file.

    Args:
        heatmap_dir: heatmaps to score (the test slides).
        scores_path: the slide-scores file written.
        model_path: the fitted model (written by the fit, read otherwise).
        val_heatmap_dir: heatmaps of labelled slides to learn from (the validation slides); needed to fit.
        truth_dir: truth folder or manifest of the slide labels (None: the label grids).
        fit: fit even when ``model_path`` exists.
        aggregator: ``logistic`` or ``random_forest``.
        threshold: heatmap threshold of the area features, and the decision threshold on P(tumor).
        top_k: cells of ``topk_mean``.
        mpp: level-0 µm/px of slides whose record has none.
        method: the method's name in the scores file.
        seed: random state.
    """

    def __init__(self, heatmap_dir: str, scores_path: str, model_path: str, val_heatmap_dir: str | None = None,
                 truth_dir: str | None = None, fit: bool = True, aggregator: str = "logistic",
                 threshold: float = 0.5, top_k: int = 10, mpp: float | None = None, method: str = "aggregation",
                 seed: int = 0):
        self.heatmap_dir, self.scores_path, self.model_path = heatmap_dir, scores_path, model_path
        self.val_heatmap_dir, self.truth_dir, self.fit = val_heatmap_dir, truth_dir, bool(fit)
        self.aggregator, self.threshold, self.top_k, self.mpp = aggregator, float(threshold), int(top_k), mpp
        self.method, self.seed = str(method), int(seed)

    def run(self) -> dict[str, Any]:
        """Fit (if asked) and score; returns ``{"scores_path", "model", "slides"}``."""
        if self.fit or not Path(self.model_path).is_file():
            if not self.val_heatmap_dir:
                raise ConfigError("`val_heatmap_dir` is needed to fit the heatmap aggregator (heatmaps of labelled "
                                  "validation slides: run inference.json with --split validation).")
            val = load_heatmap_dir(self.val_heatmap_dir)
            agg = HeatmapAggregator(self.aggregator, self.threshold, self.top_k, seed=self.seed)
            agg.fit_slides(val, heatmap_slide_labels(val, self.truth_dir), self.mpp)
            agg.save(self.model_path)
            logger.info("heatmap aggregator (%s) fitted on %d slide(s): %s -> %s", self.aggregator, len(val),
                        agg.describe(), self.model_path)
        else:
            agg = HeatmapAggregator.load(self.model_path)
        slides = load_heatmap_dir(self.heatmap_dir)
        probs = agg.predict_slides(slides, self.mpp)
        x = feature_matrix(slides, agg.threshold, agg.top_k, self.mpp)
        entries = {s.slide_id: {"score": float(p), "pred": int(p > 0.5),
                                "features": dict(zip(FEATURES, (float(v) for v in row)))}
                   for s, p, row in zip(slides, probs, x)}
        write_slide_scores(self.scores_path, self.method, entries, 0.5, model=agg.describe(),
                           heatmap_dir=str(self.heatmap_dir), model_path=str(self.model_path))
        logger.info("heatmap aggregation: %d slide(s) -> %s", len(entries), self.scores_path)
        return {"scores_path": str(self.scores_path), "model": agg.describe(), "slides": entries}
