"""Handlers shared by the slide engines."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from monai_wsi_ext.io.atomic import remove_stale_temporaries
from monai_wsi_ext.model.networks import load_checkpoint

__all__ = ["StrictCheckpointLoader", "slide_batch_item", "init_state_records", "attach_once", "SlideOutputWriter"]


def slide_batch_item(engine: Engine) -> dict:
    """The slide item of a slide engine's current iteration (its batch is one slide, collated as a list or not)."""
    batch = engine.state.batch
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def init_state_records(engine: Engine, names: tuple[str, ...] = ("results", "failed")) -> None:
    """Give ``engine.state`` an empty dict under each of ``names`` that it does not have yet (the per-slide records
    several handlers of one run fill in together)."""
    for name in names:
        if not hasattr(engine.state, name):
            setattr(engine.state, name, {})


def attach_once(engine: Engine, attached: set[int], handlers: Sequence[tuple[Any, Callable]]) -> bool:
    """Add each ``(event, function)`` of ``handlers`` to ``engine``, unless ``attached`` (the handler's own set of
    engine ids) already holds this engine: a handler that a config lists and a workflow also attaches then runs
    once. Returns True when the handlers were added."""
    if id(engine) in attached:
        return False
    attached.add(id(engine))
    for event, function in handlers:
        engine.add_event_handler(event, function)
    return True


class SlideOutputWriter:
    """Base of the handlers that write each slide's outputs under ``self.output_dir`` (heatmaps, feature files,
    tile segmentation outputs): when the run starts, the temporary files a killed run left in ``output_dir`` are
    removed and ``engine.state`` gets its ``results`` and ``failed`` records (:func:`init_state_records`); each
    iteration is timed from its start (:meth:`_seconds`); the handler itself runs when an iteration completes."""

    output_dir: Path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        remove_stale_temporaries(self.output_dir)
        init_state_records(engine)

    def _iteration_started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _seconds(self) -> float:
        """Seconds since the current iteration started, rounded to 0.01 (about 0 when no iteration has started)."""
        return round(time.perf_counter() - getattr(self, "_t0", time.perf_counter()), 2)

    def __call__(self, engine: Engine) -> None:
        raise NotImplementedError


class StrictCheckpointLoader:
    """Load trained weights into a network when the run starts, requiring every tensor by name and shape
    (:func:`~monai_wsi_ext.model.networks.load_checkpoint`): a checkpoint that does not fit stops the run before
    the first slide, naming the option, the file and what it holds. MONAI's ``CheckpointLoader`` with
    ``strict=True`` does the same loading with torch's messages; this one also says which option gave the file.

    Args:
        load_path: checkpoint file; None loads nothing (e.g. the U-Net in ``classifier`` mode).
        network: destination network.
        option: the config key that gave ``load_path``, named in errors (``encoder_ckpt``, ``unet_ckpt``).
    """

    def __init__(self, load_path: str | None, network, option: str = "encoder_ckpt"):
        self.load_path, self.network, self.option = load_path, network, option

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.load_path:
            load_checkpoint(self.network, self.load_path, option=self.option)
