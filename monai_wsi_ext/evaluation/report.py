"""Evaluate a folder of heatmaps (any model or baseline) against the patch labels and, when given, truth masks.

A heatmap folder is what :class:`~monai_wsi_ext.inference.slides.SlideInference` (and the baselines) write: one folder per
slide, ``<heatmap_dir>/<slide_id>/`` with

* ``<slide_id>_prob.npy``: ``(H, W)`` tumor probability per grid cell, NaN off tissue;
* ``<slide_id>_labels.npy``: ``(H, W)`` labels, 1 tumor, 0 normal, -1 nolabel, -2 background (optional: without it
  every cell with a probability counts as nolabel and only the truth-mask numbers are computed);
* ``<slide_id>_record.json``: ``cell_size`` (level-0 px per cell; without it the cell size is ``cell_size`` of
  :func:`evaluate_heatmaps`), ``mpp``, ``slide_size``. The writers write it last, so it marks the slide complete: a
  slide folder with outputs but no (readable) record is *incomplete* (the run writing it was killed or failed half
  way, see :func:`incomplete_slides`); it is skipped with a warning and listed under ``incomplete_slides`` in
  ``metrics_overall.json`` (``on_incomplete="error"`` makes it an error), and a folder without any complete slide
  is an error.

Ground-truth masks (optional, for the Camelyon16 lesion FROC and for Camelyon17 slide classes measured on the
annotation rather than on the patch grid) are found per slide in ``truth`` (a folder, or a synthetic-dataset
``manifest.json``), by slide id, case-insensitively, in this order:

1. ``<id>_truth.npz`` (the synthetic generator's masks: ``tumor`` at ``downsample``);
2. ``<id>_mask.tif``/``<id>_Mask.tif``/``.tiff``/``.png`` (a label-mask image; Camelyon16 marks tumor 255, ASAP
   conversions 1); the pyramid level closest to ``mask_downsample`` is read, its downsample is the slide width
   over the mask width;
3. ``<id>.xml``/``<id>.geojson``/``<id>.json`` (polygons, rasterised at ``mask_downsample``).

Outputs (written atomically; temporary files an interrupted evaluation left in the output folder are removed):
``metrics_per_slide.csv``, ``metrics_per_slide.json`` and ``metrics_overall.json``.
Undefined values (an AUC over one class, a FROC without lesions) are written as JSON ``null`` and empty CSV cells.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.utils import json_clean
from monai_wsi_ext.evaluation import metrics as M
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import (
    atomic_open,
    is_temporary_name,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "PER_SLIDE_COLUMNS",
    "SlideHeatmap",
    "TruthMask",
    "incomplete_slides",
    "load_heatmap_dir",
    "find_truth",
    "load_truth_mask",
    "read_reference_stages",
    "patient_stages",
    "evaluate_heatmaps",
    "HeatmapEvaluator",
    "METHOD_LABELS",
    "TABLE_COLUMNS",
    "COLORS",
    "summarize_runs",
    "markdown_table",
    "label_map_rgb",
    "prob_map_rgb",
    "comparison_figure",
]

logger = logging.getLogger(__name__)

PER_SLIDE_COLUMNS = (
    "slide_id", "n", "n_tumor", "n_normal", "n_correct", "accuracy", "pr_auc", "roc_auc", "dice", "tumor_points",
    "slide_score", "slide_label", "pred_class", "gt_class", "pred_diameter_um", "gt_diameter_um", "mpp",
    "cell_size", "truth", "threshold",
)
"""Columns of ``metrics_per_slide.csv`` (the JSON holds the same keys)."""

_MASK_SUFFIXES = (".tif", ".tiff", ".png")
_POLYGON_SUFFIXES = (".xml", ".geojson", ".json")


@dataclass
class SlideHeatmap:
    """One slide of a heatmap folder.

    Attributes:
        slide_id: the slide's id (the folder name).
        prob: ``(H, W)`` float tumor probabilities, NaN off tissue.
        labels: ``(H, W)`` int labels (1/0/-1/-2).
        cell_size: level-0 pixels per grid cell.
        mpp: level-0 microns per pixel, or None when unknown.
        slide_size: level-0 ``(width, height)``, or None.
        record: the ``_record.json`` content (empty when absent).
    """

    slide_id: str
    prob: np.ndarray
    labels: np.ndarray
    cell_size: float
    mpp: float | None = None
    slide_size: tuple[int, int] | None = None
    record: dict = field(default_factory=dict)


@dataclass
class TruthMask:
    """A binary ground-truth tumor mask referenced to level 0.

    Attributes:
        tumor: ``(h, w)`` boolean mask.
        downsample: level-0 pixels per mask pixel.
        source: the file it came from.
    """

    tumor: np.ndarray
    downsample: float
    source: str


# ----------------------------------------------------------------------------------------------------------------------
# reading


def _finite_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _read_record(path: Path) -> dict | None:
    """A slide's ``_record.json`` as a dict, or None when it is missing or not a JSON object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def incomplete_slides(heatmap_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None) -> dict[str, str]:
    """The incomplete slide folders of a heatmap folder: slide id -> what is wrong.

    A sub-folder ``<id>/`` is a slide folder when it holds a file named ``<id>_*`` or a temporary file of the atomic
    writer (:func:`~monai_wsi_ext.io.atomic.is_temporary_name`); it is incomplete when its ``<id>_record.json`` (the
    last file the writers write) is missing or unreadable, or when it has a record but no ``<id>_prob.npy``. Other
    sub-folders (e.g. a ``prepared/`` folder) are not slide folders.

    Args:
        heatmap_dir: the folder (a missing folder has no incomplete slide).
        slide_ids: only these slides (None: all).

    Returns:
        ``{slide id: reason}``, sorted by slide id.
    """
    root = Path(heatmap_dir)
    if not root.is_dir():
        return {}
    wanted = None if slide_ids is None else {str(s) for s in slide_ids}
    out: dict[str, str] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        sid = sub.name
        if wanted is not None and sid not in wanted:
            continue
        names = [p.name for p in sub.iterdir()]
        if not any(n.startswith(f"{sid}_") or is_temporary_name(n) for n in names):
            continue
        record_path, prob_path = sub / f"{sid}_record.json", sub / f"{sid}_prob.npy"
        if not record_path.is_file():
            reason = f"no {record_path.name}"
        elif _read_record(record_path) is None:
            reason = f"{record_path.name} is not a readable JSON object"
        elif not prob_path.is_file():
            reason = f"{record_path.name} but no {prob_path.name}"
        else:
            continue
        out[sid] = (f"{reason}: the run writing this slide was interrupted or failed; rerun inference for it "
                    f"({sub})")
    return out


def load_heatmap_dir(heatmap_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None,
                     cell_size: float | None = None) -> list[SlideHeatmap]:
    """Read every complete slide of a heatmap folder (sub-folders holding ``<id>_prob.npy`` and
    ``<id>_record.json``), sorted by slide id; incomplete slide folders (:func:`incomplete_slides`) are skipped
    with a warning.

    Args:
        heatmap_dir: the folder.
        slide_ids: only these slides (None: all).
        cell_size: level-0 pixels per cell for slides whose record has none.

    Returns:
        The complete slides.

    Raises:
        MonaiWsiExtError: the folder is missing, holds no heatmap or only incomplete ones, a wanted slide is
            missing, or a label grid's shape differs from its probability grid.
    """
    root = Path(heatmap_dir)
    if not root.is_dir():
        raise MonaiWsiExtError(f"heatmap_dir {str(root)!r} is not a folder; run inference (inference.json) first.")
    wanted = None if slide_ids is None else {str(s) for s in slide_ids}
    incomplete = incomplete_slides(root, slide_ids)
    for sid, reason in incomplete.items():
        logger.warning("%s: incomplete heatmap, not evaluated (%s)", sid, reason)
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        sid = sub.name
        prob_path = sub / f"{sid}_prob.npy"
        if sid in incomplete or not prob_path.is_file() or (wanted is not None and sid not in wanted):
            continue
        prob = np.load(prob_path).astype(np.float64)
        if prob.ndim != 2:
            raise MonaiWsiExtError(f"{prob_path}: expected a 2-D (H, W) grid, got shape {prob.shape}.")
        label_path = sub / f"{sid}_labels.npy"
        if label_path.is_file():
            labels = np.load(label_path).astype(np.int64)
            if labels.shape != prob.shape:
                raise MonaiWsiExtError(f"{label_path}: label grid {labels.shape} differs from the probability grid "
                                       f"{prob.shape} of {prob_path}; re-run inference for this slide.")
        else:
            labels = np.where(np.isfinite(prob), M.LABEL_NOLABEL, M.LABEL_BACKGROUND).astype(np.int64)
        record_path = sub / f"{sid}_record.json"
        record = _read_record(record_path) or {}
        cell = _finite_or_none(record.get("cell_size")) or _finite_or_none(cell_size)
        if cell is None:
            raise MonaiWsiExtError(f"{sub}: no cell size (no `cell_size` in {record_path.name}); pass `cell_size` "
                                   "(level-0 pixels per grid cell, the patch size at level 0).")
        size = record.get("slide_size")
        out.append(SlideHeatmap(slide_id=sid, prob=prob, labels=labels, cell_size=cell,
                                mpp=_finite_or_none(record.get("mpp")),
                                slide_size=tuple(int(v) for v in size) if size else None, record=record))
    if not out and incomplete:
        raise MonaiWsiExtError(
            f"heatmap_dir {str(root)!r} holds no complete slide: {len(incomplete)} slide folder(s) are incomplete "
            f"({_incomplete_text(incomplete)}); rerun inference (inference.json) or the baseline for them.")
    if not out:
        raise MonaiWsiExtError(f"heatmap_dir {str(root)!r} holds no <slide_id>/<slide_id>_prob.npy; run inference "
                               "(inference.json) or a baseline first.")
    if wanted is not None and len(out) + len(incomplete) < len(wanted):
        missing = sorted(wanted - {s.slide_id for s in out} - set(incomplete))
        raise MonaiWsiExtError(f"heatmap_dir {str(root)!r} has no heatmap for {missing}.")
    return out


def _incomplete_text(incomplete: Mapping[str, str], limit: int = 5) -> str:
    items = [f"{sid}: {reason.split(':')[0]}" for sid, reason in list(incomplete.items())[:limit]]
    return "; ".join(items) + ("; ..." if len(incomplete) > limit else "")


def _manifest_truth(manifest: Path) -> dict[str, Path]:
    data = json.loads(manifest.read_text())
    out = {}
    for rec in data.get("slides", []):
        ref = rec.get("truth") or rec.get("mask") or rec.get("asap_xml") or rec.get("geojson") or rec.get("annotation")
        if ref:
            path = Path(ref)
            out[str(rec.get("id"))] = path if path.is_absolute() else manifest.parent / path
    return out


def _index_folder(folder: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for sub in (folder, folder / "slides", folder / "masks", folder / "annotations"):
        if sub.is_dir():
            for p in sub.iterdir():
                if p.is_file():
                    index.setdefault(p.name.lower(), p)
    return index


def find_truth(slide_id: str, truth: str | os.PathLike | Mapping[str, str] | None,
               _cache: dict | None = None) -> Path | None:
    """The ground-truth file of a slide (see the module docstring for the names tried), or None.

    Args:
        slide_id: the slide.
        truth: a folder (also searched in its ``slides/``, ``masks/`` and ``annotations/`` sub-folders), a
            ``manifest.json`` whose records have ``id`` and ``truth`` (or ``mask``/``asap_xml``/``geojson``), a
            mapping slide id -> file, or None.

    Returns:
        The file, or None when there is none.
    """
    if truth is None:
        return None
    if isinstance(truth, Mapping):
        ref = truth.get(slide_id)
        return Path(ref) if ref else None
    root = Path(truth)
    cache = _cache if _cache is not None else {}
    if root.is_file():
        if "manifest" not in cache:
            cache["manifest"] = _manifest_truth(root)
        return cache["manifest"].get(slide_id)
    if not root.is_dir():
        raise ConfigError(f"`truth_dir` {str(root)!r} is neither a folder nor a manifest file.")
    if "index" not in cache:
        cache["index"] = _index_folder(root)
    index = cache["index"]
    sid = slide_id.lower()
    names = [f"{sid}_truth.npz"] + [f"{sid}_mask{s}" for s in _MASK_SUFFIXES] + [f"{sid}{s}" for s in
                                                                                  _POLYGON_SUFFIXES]
    for name in names:
        if name in index:
            return index[name]
    return None


def load_truth_mask(path: str | os.PathLike, slide_size: Sequence[int] | None = None, mask_downsample: float = 32.0,
                    tumor_values: Sequence[int] = (1, 2, 255), class_map: Mapping[str, str] | None = None
                    ) -> TruthMask:
    """Read a ground-truth file as a binary tumor mask with its level-0 downsample.

    Args:
        path: a ``_truth.npz``, a label-mask image (``.tif``/``.tiff``/``.png``) or a polygon file
            (``.xml``/``.geojson``/``.json``).
        slide_size: level-0 ``(width, height)``; needed for mask images (their downsample is the slide width over
            the mask width) and polygon files (the mask's extent).
        mask_downsample: for pyramidal masks, read the coarsest level whose downsample does not exceed this; for
            polygons, rasterise at this downsample (Camelyon16's evaluation uses level 5, i.e. 32).
        tumor_values: label-mask pixel values meaning tumor.
        class_map: class-name mapping for polygon files (see :func:`monai_wsi_ext.io.annotations.read_annotations`).

    Returns:
        The :class:`TruthMask`.

    Raises:
        ConfigError: ``slide_size`` is missing where needed, or the file type is unknown.
        AnnotationError: the file cannot be read.
    """
    from monai_wsi_ext.io import annotations as ann

    path = Path(path)
    name = path.name.lower()
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "tumor" not in z.files:
                raise ConfigError(f"{path}: a truth .npz needs a `tumor` mask (and `downsample`), it has {z.files}.")
            tumor = np.asarray(z["tumor"]).astype(bool)
            ds = float(z["downsample"]) if "downsample" in z.files else None
        if ds is None:
            if slide_size is None:
                raise ConfigError(f"{path}: no `downsample` in the file and no slide size to derive it from.")
            ds = float(slide_size[0]) / tumor.shape[1]
        return TruthMask(tumor, ds, str(path))
    if slide_size is None:
        raise ConfigError(f"{path}: the slide's level-0 size is needed to place this mask (no `slide_size` in the "
                          "heatmap record).")
    width, height = int(slide_size[0]), int(slide_size[1])
    if path.suffix.lower() in _MASK_SUFFIXES:
        level = ann.label_mask_level_for(path, width, mask_downsample)
        raw = ann.read_label_mask(path, level=level, tumor_values=tuple(int(v) for v in tumor_values))
        return TruthMask(raw == ann.MASK_TUMOR, width / raw.shape[1], str(path))
    if path.suffix.lower() in _POLYGON_SUFFIXES:
        ds = float(mask_downsample)
        shape = (int(math.ceil(height / ds)), int(math.ceil(width / ds)))
        polygons = ann.read_annotations(path, class_map=class_map)
        raster = ann.rasterize_annotations(polygons, shape, ds, path_for_errors=path)
        return TruthMask(raster == ann.MASK_TUMOR, ds, str(path))
    raise ConfigError(f"{path}: unknown ground-truth file type; expected _truth.npz, a mask .tif/.png or "
                      ".xml/.geojson/.json polygons.")


# ----------------------------------------------------------------------------------------------------------------------
# Camelyon17 patients


def read_reference_stages(path: str | os.PathLike) -> dict[str, str]:
    """Reference pN-stages per patient from a Camelyon17-style CSV.

    The CSV has two columns (a header row is skipped when its second cell is not a stage): rows naming a patient
    (``patient_004`` or ``patient_004.zip``) with a pN-stage; rows naming a slide (``patient_004_node_0.tif``) with
    a slide class are ignored here.

    Args:
        path: the CSV file.

    Returns:
        ``{patient id: stage}``.

    Raises:
        ConfigError: the file holds no patient stage.
    """
    stages = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2:
                continue
            name, value = row[0].strip(), row[1].strip()
            stem = name[:-4] if name.lower().endswith(".zip") else name
            if value.lower() in (s.lower() for s in M.PN_STAGE_ORDER) and "_node_" not in stem:
                stages[stem] = next(s for s in M.PN_STAGE_ORDER if s.lower() == value.lower())
    if not stages:
        raise ConfigError(f"{path}: no `patient,stage` row with a stage in {list(M.PN_STAGE_ORDER)}.")
    return stages


def patient_stages(slide_classes: Mapping[str, str], pattern: str = r"^(patient_\d+)_node_\d+") -> dict[str, dict]:
    """Group slides into patients by ``pattern`` (its first group is the patient id) and stage each patient.

    Args:
        slide_classes: ``{slide id: slide class}``.
        pattern: regular expression matched at the start of each slide id.

    Returns:
        ``{patient: {"stage": pN-stage, "slides": [ids]}}`` for the slides that match.
    """
    regex = re.compile(pattern)
    groups: dict[str, list[str]] = {}
    for sid in sorted(slide_classes):
        m = regex.match(sid)
        if m:
            groups.setdefault(m.group(1), []).append(sid)
    return {p: {"stage": M.pn_stage([slide_classes[s] for s in ids]), "slides": ids} for p, ids in groups.items()}


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        clean = json_clean(row)
        writer.writerow({k: ("" if clean.get(k) is None else clean.get(k)) for k in columns})
    return buf.getvalue()


def evaluate_heatmaps(
    heatmap_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    truth: str | os.PathLike | Mapping[str, str] | None = None,
    threshold: float = 0.5,
    mpp: float | None = None,
    cell_size: float | None = None,
    slide_ids: Sequence[str] | None = None,
    mask_downsample: float = 32.0,
    tumor_values: Sequence[int] = (1, 2, 255),
    class_map: Mapping[str, str] | None = None,
    missing_truth: str = "skip",
    froc_candidates: str = "components",
    nms_box_size: int = 3,
    max_point_size: int | None = None,
    reference_stages: str | os.PathLike | None = None,
    patient_pattern: str = r"^(patient_\d+)_node_\d+",
    write: bool = True,
    on_incomplete: str = "skip",
    slide_predictions: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Evaluate every heatmap of a folder; write the per-slide and overall metrics.

    Per slide: :func:`monai_wsi_ext.evaluation.metrics.evaluate_slide` (patch accuracy/PR-AUC/ROC-AUC with nolabel excluded,
    Dice, tumor points, slide score, Camelyon17 slide classes when the mpp is known). With truth masks the
    ground-truth class is measured on the mask. Overall: :func:`monai_wsi_ext.evaluation.metrics.summarize` (pooled and mean
    patch metrics, slide AUC when both slide classes are present), the lesion FROC over the slides with a truth
    mask, and, when slide ids name Camelyon17 patients, pN-stages and their quadratic kappa.

    Incomplete slide folders (no ``_record.json``: the run writing them stopped; see :func:`incomplete_slides`) are
    not evaluated: a warning names each, and ``overall["incomplete_slides"]`` (also in ``metrics_overall.json``)
    maps each to the reason, ``overall["n_incomplete"]`` counts them; with ``on_incomplete="error"`` any of them is
    an error.

    Args:
        heatmap_dir: the heatmap folder.
        output_dir: where the metrics files go (default: ``heatmap_dir``).
        truth: ground-truth folder / manifest / mapping (see :func:`find_truth`), or None.
        threshold: tumor where ``prob > threshold``.
        mpp: level-0 µm/px for slides whose record has none (Camelyon16 TIFFs: 0.243).
        cell_size: level-0 px per cell for slides whose record has none.
        slide_ids: evaluate only these slides.
        mask_downsample: level-0 px per truth-mask pixel for polygon files and pyramid-level choice.
        tumor_values: label-mask values meaning tumor.
        class_map: class-name mapping for polygon truth files.
        missing_truth: with ``truth`` given, a slide without a truth file is ``"skip"``-ped by the FROC or counted
            as ``"negative"`` (an empty mask: Camelyon16's normal slides have no annotation).
        froc_candidates: ``"components"`` or ``"nms"`` (:func:`monai_wsi_ext.evaluation.metrics.heatmap_candidates`),
            or ``"file"``: the lesion candidates a method wrote itself, ``<id>/<id>_candidates.json`` (``probs``,
            level-0 ``x`` and ``y``: e.g. Mask R-CNN's instances with their detection scores), the heatmap's
            components for a slide without that file.
        nms_box_size: NMS box in cells for ``"nms"``.
        max_point_size: largest component counted as a tumor point (None: any size).
        reference_stages: Camelyon17 CSV of reference pN-stages (:func:`read_reference_stages`); without it the
            reference stages come from the ground-truth slide classes.
        patient_pattern: regular expression whose first group is the patient id of a slide id.
        write: write the three files.
        on_incomplete: ``"skip"`` incomplete slide folders (warned and listed) or make them an ``"error"``.
        slide_predictions: slide-level methods to score on the same slides and labels: ``slide_scores*.json``
            files or folders holding them (:mod:`monai_wsi_ext.slidecls.scores`: the slide CNN, heatmap
            aggregation, ...). ``overall["slide_methods"]`` then has, per method and for ``heatmap_max`` (the
            heatmap's own slide score at ``threshold``), the slide ROC-AUC, accuracy, sensitivity and
            specificity (:func:`monai_wsi_ext.slidecls.scores.slide_score_metrics`) over the evaluated slides the
            method scored, and the slides it did not score.

    Returns:
        ``{"overall": {...}, "per_slide": [...], "files": {...}}``.

    Raises:
        MonaiWsiExtError: see :func:`load_heatmap_dir` (among others: no complete slide in the folder); with
            ``on_incomplete="error"``, an incomplete slide folder.
        ConfigError: a bad ``missing_truth``, ``on_incomplete`` or ``truth``.
    """
    if missing_truth not in ("skip", "negative"):
        raise ConfigError(f"`missing_truth` must be 'skip' or 'negative', got {missing_truth!r}.")
    if on_incomplete not in ("skip", "error"):
        raise ConfigError(f"`on_incomplete` must be 'skip' or 'error', got {on_incomplete!r}.")
    incomplete = incomplete_slides(heatmap_dir, slide_ids)
    if incomplete and on_incomplete == "error":
        raise MonaiWsiExtError(f"heatmap_dir {str(Path(heatmap_dir))!r}: {len(incomplete)} incomplete slide "
                               f"folder(s) ({_incomplete_text(incomplete)}); rerun inference for them, or pass "
                               "on_incomplete='skip' to evaluate the others.")
    slides = load_heatmap_dir(heatmap_dir, slide_ids, cell_size)
    default_mpp = _finite_or_none(mpp)
    cache: dict = {}
    per_slide, froc_samples, no_mpp = [], [], []
    for s in slides:
        slide_mpp = s.mpp or default_mpp
        cell_um = s.cell_size * slide_mpp if slide_mpp else s.cell_size
        res = M.evaluate_slide(s.prob, s.labels, cell_um, threshold, max_point_size=max_point_size)
        res.pop(M.PATCHES_KEY, None)
        patches_keep = (s.labels == M.LABEL_TUMOR) | (s.labels == M.LABEL_NORMAL)
        res["_probs"], res["_labels"] = s.prob[patches_keep], s.labels[patches_keep]
        res.update(slide_id=s.slide_id, mpp=slide_mpp, cell_size=s.cell_size, truth=None)
        if not slide_mpp:
            no_mpp.append(s.slide_id)
            for key in ("pred_class", "gt_class", "pred_diameter_um", "gt_diameter_um"):
                res[key] = None
        tpath = find_truth(s.slide_id, truth, cache)
        mask = None
        if tpath is not None:
            mask = load_truth_mask(tpath, s.slide_size, mask_downsample, tumor_values, class_map)
            res["truth"] = str(tpath)
            res["slide_label"] = int(mask.tumor.any())
            if slide_mpp:
                pixel_um = mask.downsample * slide_mpp
                res["gt_diameter_um"] = M.largest_tumor_diameter_um(mask.tumor, pixel_um)
                res["gt_class"] = M.slide_class_from_mask(mask.tumor, pixel_um)
        elif truth is not None and missing_truth == "negative":
            ds = float(mask_downsample)
            h = int(math.ceil(s.prob.shape[0] * s.cell_size / ds))
            w = int(math.ceil(s.prob.shape[1] * s.cell_size / ds))
            mask = TruthMask(np.zeros((h, w), bool), ds, "negative (no truth file)")
            res["truth"] = mask.source
            res["slide_label"] = 0
        if mask is not None:
            if slide_mpp:
                sample = {"prob_map": s.prob, "cell_size": s.cell_size, "tumor_mask": mask.tumor,
                          "mask_downsample": mask.downsample, "mpp": slide_mpp}
                if froc_candidates == "file":
                    sample.update(_candidates_file(Path(heatmap_dir) / s.slide_id / f"{s.slide_id}_candidates.json"))
                froc_samples.append(sample)
            else:
                logger.warning("%s: no mpp (record or `mpp`), left out of the lesion FROC.", s.slide_id)
        per_slide.append(res)
    if no_mpp:
        logger.warning("no mpp for %d slide(s) (%s...): Camelyon17 slide classes are not computed for them; pass "
                       "`mpp`.", len(no_mpp), no_mpp[:3])
    summary_input = [{**{k: v for k, v in r.items() if not k.startswith("_")},
                      M.PATCHES_KEY: {"probs": r["_probs"], "labels": r["_labels"]}}
                     for r in per_slide]
    overall: dict[str, Any] = {"heatmap_dir": str(Path(heatmap_dir)), "threshold": float(threshold)}
    overall.update(M.summarize(summary_input, threshold))
    overall["n_incomplete"] = len(incomplete)
    overall["incomplete_slides"] = dict(incomplete)
    if incomplete:
        logger.warning("%d incomplete slide folder(s) were not evaluated (listed under `incomplete_slides` in the "
                       "overall metrics): %s", len(incomplete), _incomplete_text(incomplete))
    overall["total_tumor_points"] = int(sum(int(r["tumor_points"]) for r in per_slide))
    if froc_samples:
        froc = M.lesion_froc(froc_samples, threshold=threshold,
                             candidates="components" if froc_candidates == "file" else froc_candidates,
                             nms_box_size=nms_box_size)
        overall["froc"] = froc["froc"]
        overall["froc_detail"] = {k: froc[k] for k in ("sensitivity_at", "num_targets", "num_itc", "num_images",
                                                       "num_candidates")}
    else:
        overall["froc"] = float("nan")
    classes_pred = {r["slide_id"]: r["pred_class"] for r in per_slide if r.get("pred_class")}
    classes_gt = {r["slide_id"]: r["gt_class"] for r in per_slide if r.get("gt_class")}
    pred_pat = patient_stages(classes_pred, patient_pattern)
    if pred_pat:
        ref = read_reference_stages(reference_stages) if reference_stages else {
            p: v["stage"] for p, v in patient_stages(classes_gt, patient_pattern).items()}
        both = sorted(p for p in pred_pat if p in ref)
        overall["patients"] = {p: {"pred": pred_pat[p]["stage"], "ref": ref.get(p), "slides": pred_pat[p]["slides"]}
                               for p in sorted(pred_pat)}
        overall["kappa"] = (M.quadratic_kappa([ref[p] for p in both], [pred_pat[p]["stage"] for p in both])
                            if both else float("nan"))
    scored = [r for r in per_slide if r.get("slide_score") is not None]
    overall["slide_accuracy"] = (float(np.mean([(r["slide_score"] > threshold) == bool(r["slide_label"])
                                                for r in scored])) if scored else float("nan"))
    if slide_predictions is not None:
        overall["slide_methods"] = _slide_methods(per_slide, slide_predictions, threshold)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in per_slide]
    result: dict[str, Any] = {"overall": json_clean(overall), "per_slide": json_clean(rows), "files": {}}
    if write:
        out = Path(output_dir) if output_dir is not None else Path(heatmap_dir)
        remove_stale_temporaries(out)
        files = {"per_slide_csv": out / "metrics_per_slide.csv", "per_slide_json": out / "metrics_per_slide.json",
                 "overall_json": out / "metrics_overall.json"}
        write_text_atomic(files["per_slide_csv"], _csv_text(rows, PER_SLIDE_COLUMNS))
        write_json_atomic(files["per_slide_json"], result["per_slide"])
        write_json_atomic(files["overall_json"], result["overall"])
        result["files"] = {k: str(v) for k, v in files.items()}
        logger.info("evaluated %d slide(s)%s: accuracy %s, PR-AUC %s, tumor points %d -> %s", len(rows),
                    f" ({len(incomplete)} incomplete skipped)" if incomplete else "",
                    _fmt(overall.get("pooled_accuracy")), _fmt(overall.get("pooled_pr_auc")),
                    overall["total_tumor_points"], files["overall_json"])
    return result


def _candidates_file(path: Path) -> dict[str, Any]:
    """``{"candidates": (probs, x, y)}`` from a method's candidates file, or ``{}`` (warned) when there is none."""
    if not path.is_file():
        logger.warning("%s not found: the heatmap's components are the lesion candidates of this slide.", path)
        return {}
    try:
        doc = json.loads(path.read_text())
        return {"candidates": tuple(np.asarray(doc[k], np.float64) for k in ("probs", "x", "y"))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MonaiWsiExtError(f"{path}: not a candidates file with 'probs', 'x', 'y' ({type(e).__name__}: {e}).") \
            from e


def _slide_methods(per_slide: Sequence[Mapping[str, Any]], predictions, threshold: float) -> dict[str, Any]:
    """Slide ROC-AUC and accuracy of the heatmap's maximum and of each slide-level method's scores."""
    from monai_wsi_ext.slidecls.scores import find_slide_scores, slide_score_metrics

    labels = {r["slide_id"]: int(r["slide_label"]) for r in per_slide}
    heat = {r["slide_id"]: float(r["slide_score"]) for r in per_slide if r.get("slide_score") is not None}
    out: dict[str, Any] = {"heatmap_max": {**slide_score_metrics([heat[s] for s in heat], [labels[s] for s in heat],
                                                                 threshold), "missing": sorted(set(labels) - set(heat))}}
    for method in find_slide_scores(predictions):
        ids = [s for s in labels if s in method.scores]
        row = slide_score_metrics([method.scores[s] for s in ids], [labels[s] for s in ids], method.threshold,
                                  [int(method.preds[s] != 0) for s in ids])
        row.update(missing=sorted(set(labels) - set(ids)), file=method.path)
        if row["missing"]:
            logger.warning("slide method %s: no score for %d evaluated slide(s) %s", method.method,
                           len(row["missing"]), row["missing"][:5])
        out[method.method] = row
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.4f}"


class HeatmapEvaluator:
    """:func:`evaluate_heatmaps` as a bundle component (``evaluate.json``): arguments at construction, ``run()``.

    Args:
        heatmap_dir: the heatmap folder.
        output_dir: metrics folder (default: ``heatmap_dir``).
        truth_dir: ground-truth folder or manifest (None: label grids only).
        kwargs: further :func:`evaluate_heatmaps` arguments.
    """

    def __init__(self, heatmap_dir: str, output_dir: str | None = None, truth_dir: str | None = None, **kwargs: Any):
        self.heatmap_dir, self.output_dir, self.truth_dir = heatmap_dir, output_dir, truth_dir
        self.kwargs = dict(kwargs)

    def run(self) -> dict[str, Any]:
        """Evaluate and write; returns the overall metrics."""
        result = evaluate_heatmaps(self.heatmap_dir, self.output_dir, truth=self.truth_dir, **self.kwargs)
        return result["overall"]


# ----------------------------------------------------------------------------------------------------------------------
# comparison of methods over seeds: table and figure

METHOD_LABELS = {
    "classifier": "Classifier only",
    "segmentation": "Segmentation only",
    "frozen": "Frozen features",
    "separate": "Separate learning",
    "e2e": "End-to-end learning",
}
"""Display names of the methods of the paper's comparison."""

TABLE_COLUMNS = (
    ("pooled_accuracy", "Accuracy (%)", 100.0),
    ("pooled_pr_auc", "PR-AUC (%)", 100.0),
    ("pooled_roc_auc", "ROC-AUC (%)", 100.0),
    ("mean_tumor_points", "Tumor points / slide", 1.0),
    ("mean_dice", "Dice (%)", 100.0),
    ("froc", "FROC", 1.0),
)
"""``metrics_overall.json`` keys of the comparison table, their headers and display scale."""

COLORS = {"tumor": (215, 25, 28), "normal": (190, 190, 190), "nolabel": (150, 90, 200), "background": (255, 255, 255)}
"""Map colours of the figure (the paper's Figure 5: red tumor, grey normal, purple nolabel, white background)."""


def summarize_runs(per_seed: Mapping[Any, Mapping[str, Mapping[str, Any]]],
                   methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every table metric, per method.

    Args:
        per_seed: ``{seed: {method: metrics_overall}}``.
        methods: methods in table order (None: in order of first appearance).

    Returns:
        One row per method: ``method``, ``label``, ``n_seeds`` and for each key of :data:`TABLE_COLUMNS`
        ``{"mean", "sd", "values"}`` (``sd`` with ``ddof=1``, NaN for one seed; missing values are skipped).
    """
    if methods is None:
        methods = list(dict.fromkeys(m for runs in per_seed.values() for m in runs))
    rows = []
    for method in methods:
        runs = [runs[method] for runs in per_seed.values() if method in runs]
        if not runs:
            continue
        row: dict[str, Any] = {"method": method, "label": METHOD_LABELS.get(method, method), "n_seeds": len(runs)}
        for key, _, _ in TABLE_COLUMNS:
            vals = [float(r[key]) for r in runs if r.get(key) is not None and math.isfinite(float(r[key]))]
            arr = np.asarray(vals, np.float64)
            row[key] = {"mean": float(arr.mean()) if arr.size else float("nan"),
                        "sd": float(arr.std(ddof=1)) if arr.size > 1 else float("nan"), "values": vals}
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], caption: str = "") -> str:
    """A Markdown table of :func:`summarize_runs` rows: ``mean ± sd`` per column (just the mean for one seed)."""

    def cell(stat: Mapping[str, Any], scale: float) -> str:
        mean, sd = stat["mean"], stat["sd"]
        if not math.isfinite(mean):
            return "n/a"
        digits = 2
        text = f"{mean * scale:.{digits}f}"
        return text + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")

    head = "| Method | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(TABLE_COLUMNS)
    lines = [head, sep]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(cell(row[k], s) for k, _, s in TABLE_COLUMNS) + " |")
    text = "\n".join(lines) + "\n"
    return (text + f"\n{caption}\n") if caption else text


def label_map_rgb(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` label grid -> ``(H, W, 3)`` uint8 in :data:`COLORS` (tumor, normal, nolabel, background)."""
    lab = np.asarray(labels)
    out = np.empty(lab.shape + (3,), np.uint8)
    out[:] = COLORS["background"]
    out[lab == M.LABEL_NOLABEL] = COLORS["nolabel"]
    out[lab == M.LABEL_NORMAL] = COLORS["normal"]
    out[lab == M.LABEL_TUMOR] = COLORS["tumor"]
    return out


def prob_map_rgb(prob: np.ndarray) -> np.ndarray:
    """``(H, W)`` tumor probability -> ``(H, W, 3)`` uint8: grey (0) to red (1), white where NaN."""
    p = np.asarray(prob, np.float64)
    finite = np.isfinite(p)
    q = np.clip(np.where(finite, p, 0.0), 0.0, 1.0)[..., None]
    rgb = (1 - q) * np.asarray(COLORS["normal"], np.float64) + q * np.asarray(COLORS["tumor"], np.float64)
    out = np.round(rgb).astype(np.uint8)
    out[~finite] = COLORS["background"]
    return out


def _panel(image: np.ndarray, height: int, width: int, nearest: bool = True):
    from PIL import Image

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return Image.fromarray(np.asarray(image, np.uint8)).resize((width, height), resample)


def comparison_figure(heatmaps: Mapping[str, str | os.PathLike], output_png: str | os.PathLike,
                      prepared_dir: str | os.PathLike | None = None, slide_ids: Sequence[str] | None = None,
                      max_slides: int = 3, panel_height: int = 150, gap: int = 6) -> Path:
    """A figure like the paper's Figure 5: per slide, the slide, its ground-truth map and each method's map.

    Args:
        heatmaps: ``{method: heatmap folder}`` in column order (names as in :data:`METHOD_LABELS`).
        output_png: the PNG to write (atomically).
        prepared_dir: prepared folder, to find each slide's image for the thumbnail (without it the column
            shows the tissue mask of the label grid).
        slide_ids: slides to show (default: the first ``max_slides`` present in every folder).
        max_slides: rows at most.
        panel_height: height of each panel in pixels.
        gap: pixels between panels.

    Returns:
        The PNG path.

    Raises:
        MonaiWsiExtError: when no slide is present in every heatmap folder.
    """
    from PIL import Image, ImageDraw, ImageFont

    folders = {m: Path(p) for m, p in heatmaps.items()}
    common_ids = None
    for folder in folders.values():
        ids = {p.parent.name for p in folder.glob("*/*_prob.npy") if p.name == f"{p.parent.name}_prob.npy"}
        common_ids = ids if common_ids is None else common_ids & ids
    ids = sorted(common_ids or []) if slide_ids is None else list(slide_ids)
    ids = ids[: max(int(max_slides), 1)]
    if not ids:
        raise MonaiWsiExtError(f"no slide has a heatmap in every folder of {sorted(folders)}.")
    font = ImageFont.load_default()
    titles = ["Slide", "Ground truth"] + [METHOD_LABELS.get(m, m) for m in folders]
    rows = []
    for sid in ids:
        first = next(iter(folders.values())) / sid
        labels = np.load(first / f"{sid}_labels.npy") if (first / f"{sid}_labels.npy").is_file() else None
        prob0 = np.load(first / f"{sid}_prob.npy")
        if labels is None:
            labels = np.where(np.isfinite(prob0), M.LABEL_NOLABEL, M.LABEL_BACKGROUND)
        gh, gw = labels.shape
        width = max(int(round(panel_height * gw / gh)), 1)
        thumb = None
        meta_path = Path(prepared_dir) / sid / "meta.json" if prepared_dir is not None else None
        if meta_path is not None and meta_path.is_file():
            from monai_wsi_ext.io.wsi import open_slide

            meta = json.loads(meta_path.read_text())
            try:
                with open_slide(meta["image"], mpp=meta.get("mpp") if meta.get("mpp_source") == "user" else None) as s:
                    img, ds = s.thumbnail(max_size=4 * max(panel_height, width))
                # crop the thumbnail to the grid's extent so that every panel covers the same area
                cell = float(meta["cell_size"]) / ds
                img = img[: int(round(gh * cell)), : int(round(gw * cell))]
                thumb = _panel(img, panel_height, width, nearest=False)
            except MonaiWsiExtError as e:
                logger.warning("%s: no thumbnail for the figure (%s)", sid, e)
        if thumb is None:
            thumb = _panel(np.where((labels != M.LABEL_BACKGROUND)[..., None], 200, 255).astype(np.uint8)
                           .repeat(3, axis=2), panel_height, width)
        panels = [thumb, _panel(label_map_rgb(labels), panel_height, width)]
        for folder in folders.values():
            panels.append(_panel(prob_map_rgb(np.load(folder / sid / f"{sid}_prob.npy")), panel_height, width))
        rows.append((sid, panels, width))
    col_w = [max(r[2] for r in rows)] * len(titles)
    header, label_h = 18, 14
    total_w = sum(col_w) + gap * (len(titles) + 1)
    total_h = header + len(rows) * (panel_height + label_h + gap) + gap
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for title, w in zip(titles, col_w):
        draw.text((x, 3), title, fill=(0, 0, 0), font=font)
        x += w + gap
    y = header
    for sid, panels, width in rows:
        draw.text((gap, y), sid, fill=(60, 60, 60), font=font)
        x = gap
        for panel, w in zip(panels, col_w):
            canvas.paste(panel, (x, y + label_h))
            x += w + gap
        y += panel_height + label_h + gap
    out = Path(output_png)
    with atomic_open(out) as f:
        canvas.save(f, format="PNG", optimize=True)
    return out
