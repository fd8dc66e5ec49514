"""Ignite handlers of slide inference: write each slide's heatmap outputs, then one summary for the run."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys

from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.io.atomic import remove_stale_temporaries, write_json_atomic
from monai_wsi_ext.model.predict import prob_grid
from monai_wsi_ext.outputs.writers import write_slide_outputs

__all__ = ["HeatmapWriter", "InferenceSummary"]

logger = logging.getLogger(__name__)


def _item(engine: Engine) -> dict:
    batch = engine.state.batch
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class HeatmapWriter:
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
    """

    def __init__(self, output_dir: str, threshold: float = 0.5, thumbnail_size: int = 2048, config: dict | None = None,
                 weights: dict | None = None, itk_format: str | None = None, backend: str = "auto"):
        self.output_dir, self.threshold, self.thumbnail_size = Path(output_dir), threshold, int(thumbnail_size)
        self.config, self.weights = config, {k: v for k, v in (weights or {}).items() if v}
        self.itk_format, self.backend = itk_format or None, backend
        if self.itk_format is not None:  # fail before any slide rather than on every slide
            import importlib.util

            from monai_wsi_ext.errors import ConfigError
            from monai_wsi_ext.outputs.writers import ITK_FORMATS

            if self.itk_format not in ITK_FORMATS:
                raise ConfigError(f"`itk_format` must be one of {ITK_FORMATS} or None, got {itk_format!r}.")
            if importlib.util.find_spec("itk") is None:
                raise ConfigError("`itk_format` needs the `itk` extra: pip install -e \".[itk]\"")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        remove_stale_temporaries(self.output_dir)
        if not hasattr(engine.state, "results"):
            engine.state.results = {}
        if not hasattr(engine.state, "failed"):
            engine.state.failed = {}

    def _iteration_started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None or out.get(Keys.PRED) is None:
            return  # failed slide, already recorded
        item = _item(engine)
        prepared, sid = item["prepared"], item["slide_id"]
        try:
            grid = prepared.grid
            pgrid = prob_grid(out[Keys.PRED]["probs"], grid.rows, grid.cols, grid.shape)
            thumb, thumb_ds = prepared.open(self.backend).thumbnail(max_size=self.thumbnail_size)
            written = write_slide_outputs(self.output_dir / sid, sid, pgrid, grid.cell_size, prepared.dimensions,
                                          prepared.mpp, thumb, thumb_ds, threshold=self.threshold,
                                          config=self.config, weights=self.weights, itk_format=self.itk_format,
                                          labels=grid.label_grid())
        except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
            engine.state.failed[sid] = f"{type(e).__name__}: {e}"
            logger.error("%s: writing the outputs failed (%s)", sid, e)
            return
        seconds = round(time.perf_counter() - getattr(self, "_t0", time.perf_counter()), 2)
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
