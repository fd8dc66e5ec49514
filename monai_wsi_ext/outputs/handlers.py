"""Ignite handlers of the slide evaluator's runs: write each slide's outputs (heatmaps, or feature files), then one
summary for the run."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys

from monai_wsi_ext.engines.handlers import SlideOutputWriter, slide_batch_item
from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.io.atomic import remove_stale_temporaries, write_json_atomic, write_npz_atomic
from monai_wsi_ext.model.predict import prob_grid
from monai_wsi_ext.outputs.writers import write_slide_outputs
from monai_wsi_ext.utils import file_sha256

__all__ = ["HeatmapWriter", "InferenceSummary", "dicom_seg_types", "encoder_key", "FeatureWriter", "FeatureSummary"]

logger = logging.getLogger(__name__)


def dicom_seg_types(value: str | list | tuple | None) -> tuple[str, ...]:
    """The DICOM Segmentation types an option asks for: None/``off``/``""`` -> none, ``both`` -> fractional and
    binary, a type or a list of types as given.

    Raises:
        ConfigError: an unknown type.
    """
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.outputs.dicom import SEG_TYPES

    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none", "false")):
        return ()
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    kinds = []
    for v in items:
        for kind in (SEG_TYPES if v.lower() == "both" else (v.lower(),)):
            if kind not in SEG_TYPES:
                raise ConfigError(f"`dicom_seg` must be 'fractional', 'binary', 'both', 'off' or a list of them, got "
                                  f"{value!r}.")
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)


class HeatmapWriter(SlideOutputWriter):
    """After each slide: the per-patch probabilities on the grid -> ``<output_dir>/<slide_id>/`` (``.npy``/PNG maps,
    aligned pyramidal TIFF, overlay on the slide's thumbnail, QuPath GeoJSON of tumor regions, slide score and run
    record; see :func:`~monai_wsi_ext.outputs.writers.write_slide_outputs`) and the grid labels.

    A slide whose outputs cannot be written (e.g. ``No space left on device: could not write <path>``) is recorded
    in ``engine.state.failed`` like a slide that failed inference; ``engine.state.results`` collects the written
    slides. Every file is written atomically and the slide's ``<slide_id>_record.json`` last (the label grid goes
    before it), so a slide folder without a record is incomplete and the next run writes the slide again;
    temporary files a killed run left in ``output_dir`` (and in each slide folder it writes) are removed.

    Args:
        output_dir: one folder per slide below it.
        threshold: tumor threshold of the regions and the overlay outline.
        thumbnail_size: longest side of the overlay's thumbnail.
        config: the configuration to record (and hash) in each record.
        weights: name -> weights file, hashed into the records.
        itk_format: also write the map as an ITK image (``nrrd``/``mha``; needs the ``itk`` extra).
        backend: reader backend for the thumbnail when the slide is not open any more.
        dicom_seg: for DICOM slides, also the map as DICOM Segmentation(s) on the slide's geometry: ``fractional``,
            ``binary`` (at ``threshold``), ``both``, or a list; None or ``off``: none. Slides that are not DICOM get
            no DICOM outputs (their record says why). Needs the ``dicom`` extra (checked here).
        dicom_annotations: for DICOM slides, also the tumor regions as Microscopy Bulk Simple Annotations.
    """

    def __init__(self, output_dir: str, threshold: float = 0.5, thumbnail_size: int = 2048, config: dict | None = None,
                 weights: dict | None = None, itk_format: str | None = None, backend: str = "auto",
                 dicom_seg: str | list | None = None, dicom_annotations: bool = False):
        self.output_dir, self.threshold, self.thumbnail_size = Path(output_dir), threshold, int(thumbnail_size)
        self.config, self.weights = config, {k: v for k, v in (weights or {}).items() if v}
        self.itk_format, self.backend = itk_format or None, backend
        self.dicom_seg, self.dicom_annotations = dicom_seg_types(dicom_seg), bool(dicom_annotations)
        if self.dicom_seg or self.dicom_annotations:  # fail before any slide rather than on every DICOM slide
            from monai_wsi_ext.outputs.dicom import require_highdicom

            require_highdicom()
        if self.itk_format is not None:  # fail before any slide rather than on every slide
            import importlib.util

            from monai_wsi_ext.errors import ConfigError
            from monai_wsi_ext.outputs.writers import ITK_FORMATS

            if self.itk_format not in ITK_FORMATS:
                raise ConfigError(f"`itk_format` must be one of {ITK_FORMATS} or None, got {itk_format!r}.")
            if importlib.util.find_spec("itk") is None:
                raise ConfigError("`itk_format` needs the `itk` extra: pip install -e \".[itk]\"")

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None or out.get(Keys.PRED) is None:
            return  # failed slide, already recorded
        item = slide_batch_item(engine)
        prepared, sid = item["prepared"], item["slide_id"]
        try:
            grid = prepared.grid
            pgrid = prob_grid(out[Keys.PRED]["probs"], grid.rows, grid.cols, grid.shape)
            slide = prepared.open(self.backend)
            thumb, thumb_ds = slide.thumbnail(max_size=self.thumbnail_size)
            source = getattr(slide, "dicom", None)
            if source is None and (self.dicom_seg or self.dicom_annotations):
                logger.info("%s: not a DICOM slide, so no DICOM outputs (they reference the source slide)", sid)
            written = write_slide_outputs(self.output_dir / sid, sid, pgrid, grid.cell_size, prepared.dimensions,
                                          prepared.mpp, thumb, thumb_ds, threshold=self.threshold,
                                          config=self.config, weights=self.weights, itk_format=self.itk_format,
                                          labels=grid.label_grid(), dicom_source=source, dicom_seg=self.dicom_seg,
                                          dicom_annotations=self.dicom_annotations)
        except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
            engine.state.failed[sid] = f"{type(e).__name__}: {e}"
            logger.error("%s: writing the outputs failed (%s)", sid, e)
            return
        seconds = self._seconds()
        engine.state.results[sid] = {"slide_score": written["slide_score"], "status": written.get("status", "ok"),
                                     "n_regions": written.get("n_regions"), "n_patches": len(grid),
                                     "seconds": seconds, "dir": str(self.output_dir / sid)}
        logger.info("%s: %d patches, slide score %s, %.1f s -> %s", sid, len(grid), written["slide_score"],
                    seconds, self.output_dir / sid)


class InferenceSummary:
    """At the end of the run: ``<output_dir>/inference_summary.json`` with every written slide and every failure;
    raises when any slide failed (so ``python -m monai.bundle run`` exits non-zero) or when there was no slide.

    Args:
        output_dir: where the summary goes.
        mode: recorded in the summary (``canvas`` or ``classifier``).
        failed: failures that happened before the run (e.g. while collecting the slides), slide id -> reason.
    """

    def __init__(self, output_dir: str, mode: str = "canvas", failed: dict | None = None):
        self.output_dir, self.mode, self.failed = Path(output_dir), mode, dict(failed or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        failed = {**self.failed, **getattr(engine.state, "failed", {})}
        results = getattr(engine.state, "results", {})
        summary = {"mode": self.mode, "slides": results, "failed": failed, "output_dir": str(self.output_dir)}
        write_json_atomic(self.output_dir / "inference_summary.json", summary)
        engine.state.summary = summary
        if failed:
            raise MonaiWsiExtError(f"inference failed for {len(failed)} slide(s): {failed}")
        if not results:
            raise MonaiWsiExtError("inference ran on no slide (no input slides, or none in the selected split)")


def encoder_key(encoder: torch.nn.Module, checkpoint: str | None = None, transform_desc: dict | None = None) -> str:
    """Identity of an encoder and its patch transform, part of each feature file's ``cache_key``: a hash of
    ``transform_desc`` and of the checkpoint file (no checkpoint, or a missing file: of the encoder's weights).

    Args:
        encoder: the patch encoder.
        checkpoint: its weights file.
        transform_desc: the settings of the patch transform (``{"crop": crop_size, "stain": stain_normalize}``).
    """
    h = hashlib.sha256(json.dumps(transform_desc, sort_keys=True).encode())
    sha = file_sha256(checkpoint)
    if sha is not None:
        h.update(sha.encode())
    else:
        for k, v in encoder.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _table_sha(prepared) -> str | None:
    """SHA-256 of a prepared slide's patch table (``patches.csv``); for a slide prepared in memory, of its grid."""
    if prepared.dir is not None:
        return file_sha256(Path(prepared.dir) / "patches.csv")
    grid = prepared.grid
    h = hashlib.sha256(f"{grid.level}:{grid.patch_size}:{grid.cell_size}:{tuple(grid.shape)}".encode())
    for a in (grid.x, grid.y, grid.rows, grid.cols, grid.labels):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()


class FeatureWriter(SlideOutputWriter):
    """Feature files of the feature extraction run (``extract_features.json``): after each slide, the encoder's
    output of the slide inferer (:class:`~monai_wsi_ext.model.predict.CanvasInferer` in ``classifier`` mode:
    ``features`` and ``head_probs``, else ``probs``) -> ``<output_dir>/<slide_id>.npz`` with ``features`` (N, C),
    ``probs`` (the encoder head's tumor probability per patch), ``rows``, ``cols``, ``labels``, ``grid_shape``,
    ``cell_size``, ``split``, ``slide_id``, ``image``, ``mpp``, ``dimensions`` and ``cache_key``.

    A slide is not recomputed when its feature file holds the same ``cache_key`` (a hash of the patch table, the
    encoder checkpoint and the transform, see :func:`encoder_key`): before its iteration the item gets
    ``skip="unchanged"`` and the :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` does not infer it
    (``overwrite`` recomputes every slide). ``engine.state.results`` collects the written slides,
    ``engine.state.skipped`` the unchanged ones.

    Each file is written atomically (:func:`~monai_wsi_ext.io.atomic.write_npz_atomic`): a kill or a full disk
    never leaves a truncated ``.npz`` under its name, a write error fails the slide naming the path (``No space
    left on device: could not write <path>``, in ``engine.state.failed``), and the temporary files a killed run
    left in ``output_dir`` are removed when the run starts.

    Args:
        output_dir: the feature folder.
        encoder: the patch encoder (its weights are hashed when there is no ``checkpoint``).
        checkpoint: the encoder's weights file (hashed into the cache key).
        transform_desc: the patch transform's settings hashed into the cache key (``{"crop": crop_size,
            "stain": stain_normalize}`` for the eval transform).
        overwrite: recompute every slide.
    """

    def __init__(self, output_dir: str, encoder: torch.nn.Module, checkpoint: str | None = None,
                 transform_desc: dict | None = None, overwrite: bool = False):
        self.output_dir, self.encoder, self.checkpoint = Path(output_dir), encoder, checkpoint
        self.transform_desc, self.overwrite = dict(transform_desc or {}), bool(overwrite)
        self._key: str | None = None

    def _started(self, engine: Engine) -> None:
        remove_stale_temporaries(self.output_dir)
        self._key = encoder_key(self.encoder, self.checkpoint, self.transform_desc)
        for name, empty in (("results", dict), ("failed", dict), ("skipped", list)):
            if not hasattr(engine.state, name):
                setattr(engine.state, name, empty())

    def cache_key(self, prepared) -> str:
        """The ``cache_key`` of a prepared slide's feature file with this encoder and transform."""
        if self._key is None:
            self._key = encoder_key(self.encoder, self.checkpoint, self.transform_desc)
        return hashlib.sha256(f"{self._key}:{_table_sha(prepared)}".encode()).hexdigest()

    def is_up_to_date(self, prepared) -> bool:
        """Whether ``prepared``'s feature file exists and holds this encoder's and transform's ``cache_key`` for its
        patch table (the slide would get ``skip="unchanged"``; a distributed run leaves such slides out of its
        shards, :class:`~monai_wsi_ext.distributed.ShardedSlideDataset`)."""
        return self._holds(self.output_dir / f"{prepared.slide_id}.npz", self.cache_key(prepared))

    @staticmethod
    def _holds(path: Path, cache_key: str) -> bool:
        if not path.exists():
            return False
        try:
            with np.load(path) as old:
                return str(old["cache_key"]) == cache_key
        except Exception:  # noqa: BLE001 - an unreadable feature file is recomputed
            return False

    def _iteration_started(self, engine: Engine) -> None:
        super()._iteration_started(engine)
        item = slide_batch_item(engine)
        if not isinstance(item, dict) or item.get("error") or item.get("prepared") is None:
            return
        sid = item["slide_id"]
        try:
            item["cache_key"] = self.cache_key(item["prepared"])
        except OSError as e:  # the patch table cannot be read: the slide fails, the run goes on
            item["error"] = f"{type(e).__name__}: {e}"
            return
        if not self.overwrite and self._holds(self.output_dir / f"{sid}.npz", item["cache_key"]):
            item["skip"] = "unchanged"
            engine.state.skipped.append(sid)
            logger.info("%s: feature file unchanged, not recomputed", sid)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None or out.get(Keys.PRED) is None:
            return  # failed or unchanged slide, already recorded
        item = slide_batch_item(engine)
        prepared, sid, pred = item["prepared"], item["slide_id"], out[Keys.PRED]
        path = self.output_dir / f"{sid}.npz"
        probs = pred.get("head_probs")
        try:
            grid = prepared.grid
            cache_key = item.get("cache_key") or self.cache_key(prepared)
            write_npz_atomic(path, features=pred["features"], probs=pred["probs"] if probs is None else probs,
                             rows=grid.rows, cols=grid.cols, labels=grid.labels, grid_shape=np.asarray(grid.shape),
                             cell_size=np.float64(grid.cell_size), split=np.str_(prepared.split),
                             slide_id=np.str_(sid), image=np.str_(prepared.image),
                             mpp=np.float64(prepared.mpp or np.nan), dimensions=np.asarray(prepared.dimensions),
                             cache_key=np.str_(cache_key))
        except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
            engine.state.failed[sid] = f"{type(e).__name__}: {e}"
            logger.error("%s: writing the feature file failed (%s)", sid, e)
            return
        seconds = self._seconds()
        engine.state.results[sid] = {"file": str(path), "n_patches": len(grid), "seconds": seconds}
        logger.info("%s: %d patches encoded in %.1f s", sid, len(grid), seconds)


class FeatureSummary:
    """At the end of the feature extraction run: ``<output_dir>/features_summary.json`` (``done``, ``skipped``,
    ``failed`` slide id -> reason, ``output_dir``); raises when any slide failed, so ``python -m monai.bundle run``
    exits non-zero.

    Args:
        output_dir: the feature folder.
    """

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        failed = dict(getattr(engine.state, "failed", {}))
        summary = {"done": list(getattr(engine.state, "results", {})),
                   "skipped": list(getattr(engine.state, "skipped", [])), "failed": failed,
                   "output_dir": str(self.output_dir)}
        write_json_atomic(self.output_dir / "features_summary.json", summary)
        engine.state.summary = summary
        logger.info("features: %d computed, %d unchanged, %d failed", len(summary["done"]), len(summary["skipped"]),
                    len(failed))
        if failed:
            raise MonaiWsiExtError(f"feature extraction failed for {sorted(failed)}: {failed}")
