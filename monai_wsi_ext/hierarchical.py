"""The hierarchical pipeline: a slide classifier decides which slides the (costly) segmentation runs on.

The review articles' "hierarchical approach" avoids redundant processing: a cheap slide-level classifier runs first
and only the slides it passes go to the pixel- or patch-level method. ``bundle/configs/hierarchical.json`` is an
overlay on the segmentation run it gates (``infer_tile_seg.json`` or ``inference.json``)::

    gate (slide CNN, or any slide-scores file) --P(tumor) > gate_threshold--> canvas method / tile segmentation
                                               \\--otherwise--> skipped: an all-negative heatmap, recorded

* :class:`SlideGate` scores a prepared slide: a classifier callable (the slide CNN,
  :class:`~monai_wsi_ext.slidecls.cnn.SlideCNNClassifier`) or the scores of a slide-scores file
  (:mod:`~monai_wsi_ext.slidecls.scores`: the slide CNN's output, heatmap aggregation of a cheap model, ...).
* :class:`GatedSlideDataset` wraps the run's slide dataset: a slide the gate rejects gets a ``skip`` reason, so the
  :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` does not infer it (its writers see no prediction).
* :class:`HierarchicalReport` writes, for each skipped slide, the all-negative grid outputs (``<id>_prob.npy`` 0 on
  tissue, ``<id>_labels.npy``, ``<id>_record.json`` with ``skipped_by_gate``), so ``evaluate.json`` scores the
  chain on every slide, and at the end ``hierarchical_summary.json``: the slides passed and skipped with their
  gate scores, the patches (grid cells) and, for tile segmentation, the tiles not inferred, the time of the gate
  and of the method, and, given the heatmaps of the full method run on every slide (``full_heatmap_dir``), the
  compute saved (measured seconds) and the sensitivity lost (tumor slides missed, tumor patches and lesion FROC
  against the full run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from torch.utils.data import Dataset

from monai_wsi_ext.engines.handlers import attach_once, init_state_records, slide_batch_item
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import write_json_atomic, write_npy_atomic
from monai_wsi_ext.labels import LABEL_TUMOR
from monai_wsi_ext.model.predict import prob_grid
from monai_wsi_ext.prep.prepare import PreparedSlide
from monai_wsi_ext.slidecls.scores import read_slide_scores

__all__ = ["GATE_MISSING", "SlideGate", "GatedSlideDataset", "HierarchicalReport", "write_skipped_outputs",
           "chain_comparison"]

logger = logging.getLogger(__name__)

#: what :class:`SlideGate` does with a slide its scores file does not list
GATE_MISSING = ("pass", "skip", "error")
SUMMARY_NAME = "hierarchical_summary.json"


class SlideGate:
    """The first stage of the chain: P(tumor) of a slide, and whether it goes on.

    Args:
        threshold: a slide passes when its score is above it (0: every slide passes).
        classifier: a callable ``classifier(prepared) -> P(tumor)`` (e.g.
            :class:`~monai_wsi_ext.slidecls.cnn.SlideCNNClassifier`).
        scores: a slide-scores file instead of a classifier.
        missing: a slide the scores file does not list ``pass``-es (the safe default: never lose a slide to a
            missing score), is ``skip``-ped, or is an ``error``.
        name: the gate's name in the summary.

    Raises:
        ConfigError: neither or both of ``classifier`` and ``scores``, or a bad setting.
    """

    def __init__(self, threshold: float = 0.5, classifier: Callable[[PreparedSlide], float] | None = None,
                 scores: str | None = None, missing: str = "pass", name: str | None = None):
        if (classifier is None) == (scores is None):
            raise ConfigError("the hierarchical gate needs exactly one of `classifier` (e.g. the slide CNN: "
                              "gate_ckpt) and `scores` (a slide-scores file: gate_scores).")
        if missing not in GATE_MISSING:
            raise ConfigError(f"`gate_missing` must be one of {GATE_MISSING}, got {missing!r}.")
        if not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) < 1.0):
            raise ConfigError(f"`gate_threshold` must be in [0, 1), got {threshold!r}.")
        self.threshold, self.classifier, self.missing = float(threshold), classifier, missing
        self.scores = read_slide_scores(scores) if scores is not None else None
        self.name = name or (self.scores.method if self.scores is not None else type(classifier).__name__)

    def __call__(self, prepared: PreparedSlide) -> dict[str, Any]:
        """``{"score", "passed", "seconds", "note"}`` of one slide."""
        t0 = time.perf_counter()
        note = None
        if self.scores is not None:
            score = self.scores.scores.get(prepared.slide_id)
            if score is None:
                if self.missing == "error":
                    raise MonaiWsiExtError(f"{prepared.slide_id}: no score in the gate's file {self.scores.path}.")
                note = f"no gate score in {self.scores.path}: {'passed' if self.missing == 'pass' else 'skipped'}"
                return {"score": None, "passed": self.missing == "pass", "seconds": 0.0, "note": note}
        else:
            score = float(self.classifier(prepared))
        return {"score": float(score), "passed": bool(score > self.threshold),
                "seconds": round(time.perf_counter() - t0, 4), "note": note}


class GatedSlideDataset(Dataset):
    """A slide dataset whose items the gate has seen: ``item["gate"]`` holds its decision, and a rejected slide gets
    ``item["skip"]`` (the slide evaluator then does not run the method on it). A slide that could not be prepared
    keeps its ``error``; a gate that fails on a slide makes it an ``error`` too (recorded, the run goes on).

    Args:
        dataset: the run's slide dataset (:class:`~monai_wsi_ext.inference.slides.SlideDataset`).
        gate: the :class:`SlideGate`.

    Attributes:
        decisions: slide id -> the gate's decision, for every item served.
    """

    def __init__(self, dataset: Dataset, gate: SlideGate):
        self.dataset, self.gate = dataset, gate
        self.decisions: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if item.get("error"):
            return item
        sid = item["slide_id"]
        try:
            decision = self.gate(item["prepared"])
        except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
            return {"slide_id": sid, "error": f"gate: {type(e).__name__}: {e}"}
        self.decisions[sid] = decision
        item["gate"] = decision
        if not decision["passed"]:
            score = decision["score"]
            item["skip"] = (f"gate {self.gate.name}: P(tumor) {score:.3f} <= {self.gate.threshold}" if score is not None
                            else f"gate {self.gate.name}: {decision['note']}")
        return item


def _tile_count(inferer: Any, prepared: PreparedSlide, backend: str) -> int | None:
    """Tissue tiles the tile-segmentation inferer would read on this slide (None for other inferers)."""
    if not hasattr(inferer, "splitter") or not hasattr(inferer, "target_mpp"):
        return None
    from monai_wsi_ext.tileseg.tiles import SlideAtMpp, prepared_tissue

    view = SlideAtMpp(prepared.open(backend), inferer.target_mpp)
    return int(len(inferer.splitter(prepared_tissue(prepared, backend)).locations(view)))


def write_skipped_outputs(out_dir: Path, prepared: PreparedSlide, decision: Mapping[str, Any],
                          gate_name: str) -> dict[str, Path]:
    """The all-negative grid outputs of a slide the gate rejected (probability 0 on every tissue cell), in the layout
    ``evaluate.json`` reads; the record (written last) says ``skipped_by_gate``."""
    grid, sid = prepared.grid, prepared.slide_id
    d = Path(out_dir) / sid
    d.mkdir(parents=True, exist_ok=True)
    paths = {"prob_npy": write_npy_atomic(d / f"{sid}_prob.npy",
                                          prob_grid(np.zeros(len(grid), np.float32), grid.rows, grid.cols, grid.shape)),
             "labels_npy": write_npy_atomic(d / f"{sid}_labels.npy", grid.label_grid())}
    record = {"slide_id": sid, "method": "hierarchical", "skipped_by_gate": True, "gate": gate_name,
              "gate_score": decision.get("score"), "gate_note": decision.get("note"), "slide_score": 0.0,
              "cell_size": float(grid.cell_size), "mpp": prepared.mpp, "slide_size": list(prepared.dimensions),
              "n_patches": int(len(grid))}
    paths["record_json"] = write_json_atomic(d / f"{sid}_record.json", record)
    return paths


class HierarchicalReport:
    """Handler of the gated run: writes the skipped slides' outputs and ``hierarchical_summary.json``.

    Attach it before the run's :class:`~monai_wsi_ext.outputs.handlers.InferenceSummary` (``hierarchical.json``
    does): skipped slides are added to ``engine.state.results`` with status ``skipped_by_gate``, so a run whose gate
    rejects every slide still completes.

    Args:
        output_dir: the chain's heatmap folder.
        gate: the run's :class:`SlideGate`.
        inferer: the gated method's inferer (its tiles are counted for tile segmentation).
        chain: the chain's stages as declared (recorded).
        full_heatmap_dir: heatmaps of the full method on every slide (its ``inference_summary.json`` gives the
            measured seconds) to compare with; None: compute saved is estimated from this run.
        truth_dir: truth folder or manifest for the comparison's lesion FROC (None: patch labels only).
        threshold: tumor threshold of the comparison.
        count_tiles: count the tiles the skipped slides would have needed (tile segmentation).
        backend: slide reader backend.
    """

    def __init__(self, output_dir: str, gate: SlideGate, inferer: Any = None, chain: Sequence[str] | None = None,
                 full_heatmap_dir: str | None = None, truth_dir: str | None = None, threshold: float = 0.5,
                 count_tiles: bool = True, backend: str = "auto"):
        self.output_dir, self.gate, self.inferer = Path(output_dir), gate, inferer
        self.chain = list(chain or [])
        self.full_heatmap_dir, self.truth_dir, self.threshold = full_heatmap_dir, truth_dir, float(threshold)
        self.count_tiles, self.backend = bool(count_tiles), backend
        self._attached: set[int] = set()

    def attach(self, engine: Engine) -> None:
        attach_once(engine, self._attached, [(Events.STARTED, self._started), (Events.ITERATION_COMPLETED, self),
                                             (Events.COMPLETED, self.summarize)])

    def _started(self, engine: Engine) -> None:
        init_state_records(engine)
        self.slides: dict[str, dict] = {}
        self._t0 = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        item = slide_batch_item(engine)
        decision = item.get("gate") if isinstance(item, dict) else None
        if decision is None:
            return  # failed before the gate: recorded by the evaluator
        prepared, sid = item["prepared"], item["slide_id"]
        entry = {"gate_score": decision["score"], "passed": decision["passed"], "gate_seconds": decision["seconds"],
                 "n_patches": int(len(prepared.grid)),
                 "n_tumor_patches": int((np.asarray(prepared.grid.labels) == LABEL_TUMOR).sum())}
        if decision.get("note"):
            entry["note"] = decision["note"]
        if not decision["passed"]:
            try:
                write_skipped_outputs(self.output_dir, prepared, decision, self.gate.name)
                if self.count_tiles:
                    entry["n_tiles"] = _tile_count(self.inferer, prepared, self.backend)
            except (MonaiWsiExtError, OSError, ValueError) as e:
                engine.state.failed[sid] = f"{type(e).__name__}: {e}"
                logger.error("%s: writing the skipped slide's outputs failed (%s)", sid, e)
                return
            engine.state.results[sid] = {"slide_score": 0.0, "status": "skipped_by_gate",
                                         "gate_score": decision["score"], "dir": str(self.output_dir / sid)}
            logger.info("%s: skipped by the gate (%s)", sid, item.get("skip"))
        else:
            result = engine.state.results.get(sid, {})
            entry["seconds"] = result.get("seconds")
            entry["n_tiles"] = result.get("tiles")
        self.slides[sid] = entry

    def summarize(self, engine: Engine) -> dict[str, Any]:
        slides = self.slides
        passed = {s: e for s, e in slides.items() if e["passed"]}
        skipped = {s: e for s, e in slides.items() if not e["passed"]}
        gate_s = sum(e["gate_seconds"] for e in slides.values())
        method_s = sum(float(e.get("seconds") or 0.0) for e in passed.values())

        def total(key: str, which: Mapping[str, dict]) -> int | None:
            values = [e.get(key) for e in which.values()]
            return None if any(v is None for v in values) else int(sum(values))

        summary: dict[str, Any] = {
            "chain": self.chain, "gate": self.gate.name, "gate_threshold": self.gate.threshold,
            "n_slides": len(slides), "n_passed": len(passed), "n_skipped": len(skipped),
            "skipped": {s: e["gate_score"] for s, e in sorted(skipped.items())},
            "passed": {s: e["gate_score"] for s, e in sorted(passed.items())},
            "patches_total": total("n_patches", slides), "patches_skipped": total("n_patches", skipped),
            "tiles_skipped": total("n_tiles", skipped) if skipped else 0,
            "tiles_inferred": total("n_tiles", passed) if passed else 0,
            "tumor_patches_total": total("n_tumor_patches", slides),
            "tumor_patches_skipped": total("n_tumor_patches", skipped),
            "slides_with_tumor_skipped": sorted(s for s, e in skipped.items() if e["n_tumor_patches"] > 0),
            "gate_seconds": round(gate_s, 3), "method_seconds": round(method_s, 3),
            "run_seconds": round(time.perf_counter() - getattr(self, "_t0", time.perf_counter()), 3),
            "failed": dict(getattr(engine.state, "failed", {})), "per_slide": slides,
        }
        if summary["patches_total"]:
            summary["patch_fraction_skipped"] = round(summary["patches_skipped"] / summary["patches_total"], 4)
        if passed:  # what the skipped slides would have cost, at this run's mean seconds per passed slide
            summary["estimated_saved_seconds"] = round(method_s / len(passed) * len(skipped) - gate_s, 3)
        if self.full_heatmap_dir:
            summary["vs_full"] = chain_comparison(self.output_dir, self.full_heatmap_dir, self.truth_dir,
                                                  self.threshold, chain_seconds=gate_s + method_s)
        write_json_atomic(self.output_dir / SUMMARY_NAME, summary)
        engine.state.hierarchical = summary
        logger.info("hierarchical: %d of %d slide(s) skipped by the gate (%s patches, %s tiles); gate %.1f s, method "
                    "%.1f s -> %s", len(skipped), len(slides), summary["patches_skipped"], summary["tiles_skipped"],
                    gate_s, method_s, self.output_dir / SUMMARY_NAME)
        return summary


def _patch_sensitivity(slides, threshold: float) -> tuple[int, int]:
    hit = total = 0
    for s in slides:
        tumor = s.labels == LABEL_TUMOR
        total += int(tumor.sum())
        hit += int((np.nan_to_num(s.prob[tumor], nan=0.0) > threshold).sum())
    return hit, total


def chain_comparison(chain_dir: str | Path, full_dir: str | Path, truth: str | None = None, threshold: float = 0.5,
                     chain_seconds: float | None = None) -> dict[str, Any]:
    """The chain's heatmaps against the full method's on the same slides: compute saved and sensitivity lost.

    Args:
        chain_dir: the gated run's heatmap folder (skipped slides all-negative).
        full_dir: the full method's heatmap folder (every slide inferred).
        truth: truth folder or manifest for the lesion FROC (None: no FROC).
        threshold: tumor threshold.
        chain_seconds: the chain's seconds (gate + method); None: from ``chain_dir``'s inference summary.

    Returns:
        ``slides`` compared, ``full_seconds`` (the full run's per-slide seconds, from its
        ``inference_summary.json``), ``chain_seconds``, ``saved_seconds`` and ``saved_fraction``; patch sensitivity
        (tumor patches above ``threshold``) of both and its loss; slide sensitivity (tumor slides with a cell above
        ``threshold``) of both; with ``truth`` the lesion FROC of both and its loss.

    Raises:
        MonaiWsiExtError: a folder without heatmaps, or slides of one folder missing from the other.
    """
    from monai_wsi_ext.evaluation.report import evaluate_heatmaps, load_heatmap_dir

    chain = {s.slide_id: s for s in load_heatmap_dir(chain_dir)}
    full = {s.slide_id: s for s in load_heatmap_dir(full_dir)}
    missing = sorted(set(chain) - set(full))
    if missing:
        raise MonaiWsiExtError(f"{full_dir}: the full run has no heatmap for {missing[:5]} (run the method on every "
                               "slide of the chain's split).")
    ids = sorted(chain)
    out: dict[str, Any] = {"full_heatmap_dir": str(full_dir), "slides": len(ids)}
    summary_path = Path(full_dir) / "inference_summary.json"
    if summary_path.is_file():
        per = json.loads(summary_path.read_text()).get("slides", {})
        secs = [per.get(s, {}).get("seconds") for s in ids]
        if all(v is not None for v in secs):
            out["full_seconds"] = round(float(sum(secs)), 3)
    if chain_seconds is None:
        cpath = Path(chain_dir) / "inference_summary.json"
        if cpath.is_file():
            per = json.loads(cpath.read_text()).get("slides", {})
            chain_seconds = float(sum(float(v.get("seconds") or 0.0) for v in per.values()))
    if chain_seconds is not None:
        out["chain_seconds"] = round(float(chain_seconds), 3)
        if "full_seconds" in out:
            out["saved_seconds"] = round(out["full_seconds"] - out["chain_seconds"], 3)
            full_s = out["full_seconds"]
            out["saved_fraction"] = round(out["saved_seconds"] / full_s, 4) if full_s else None
    for name, group in (("chain", [chain[s] for s in ids]), ("full", [full[s] for s in ids])):
        hit, total = _patch_sensitivity(group, threshold)
        out[f"patch_sensitivity_{name}"] = hit / total if total else math.nan
        tumor_slides = [s for s in group if (s.labels == LABEL_TUMOR).any()]
        found = [s for s in tumor_slides if np.nanmax(np.where(np.isfinite(s.prob), s.prob, 0.0)) > threshold]
        out[f"slide_sensitivity_{name}"] = len(found) / len(tumor_slides) if tumor_slides else math.nan
    out["patch_sensitivity_lost"] = out["patch_sensitivity_full"] - out["patch_sensitivity_chain"]
    out["slide_sensitivity_lost"] = out["slide_sensitivity_full"] - out["slide_sensitivity_chain"]
    if truth is not None:
        c = evaluate_heatmaps(chain_dir, truth=truth, threshold=threshold, slide_ids=ids, write=False)["overall"]
        f = evaluate_heatmaps(full_dir, truth=truth, threshold=threshold, slide_ids=ids, write=False)["overall"]
        out["froc_chain"], out["froc_full"] = c.get("froc"), f.get("froc")
        if out["froc_chain"] is not None and out["froc_full"] is not None:
            out["froc_lost"] = out["froc_full"] - out["froc_chain"]
    return out
