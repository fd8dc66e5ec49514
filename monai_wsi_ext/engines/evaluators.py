"""Slide-level validation (one slide per iteration) and the evaluators' post-transforms."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.utils.enums import CommonKeys as Keys

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.model.canvas import IGNORE_INDEX
from monai_wsi_ext.prep.grid import PatchLabel

__all__ = ["tumor_probability", "labelled_cells", "labelled_patches", "SlideEvaluator"]

logger = logging.getLogger(__name__)


def tumor_probability(data: dict) -> dict:
    """Post-transform for patch classifiers: ``pred`` logits (B, 2) -> class-1 probabilities (B,)."""
    d = dict(data)
    d[Keys.PRED] = torch.softmax(d[Keys.PRED].float(), dim=1)[:, 1].detach()
    return d


def labelled_cells(data: dict) -> dict:
    """Post-transform for canvas evaluators: turn ``pred`` logits (B, K, H, W) and ``label`` (B, H, W) into the
    class-1 probabilities and labels of the labelled cells only (``pred`` (n,), ``label`` (n,)), i.e. patch-level
    values gathered back from the canvas, for accuracy and PR-AUC."""
    d = dict(data)
    pred, label = d[Keys.PRED], d[Keys.LABEL]
    if pred.ndim == 3:
        pred, label = pred[None], label[None]
    prob = torch.softmax(pred.float(), dim=1)[:, 1]
    lab = label[:, 0] if label.ndim == 4 else label
    if lab.ndim == 2:
        lab = lab[None]
    keep = lab != IGNORE_INDEX
    d[Keys.PRED], d[Keys.LABEL] = prob[keep].detach(), lab[keep].long()
    return d


def labelled_patches(data: dict) -> dict:
    """Post-transform for :class:`SlideEvaluator`: the per-patch tumor probabilities of the inferer (``pred``
    ``{"probs": ...}``) and the slide item's grid labels (``image["labels"]``) -> ``pred`` (n,) and ``label`` (n,)
    of the labelled patches only, for accuracy and PR-AUC."""
    d = dict(data)
    labels = torch.as_tensor(d[Keys.IMAGE]["labels"]).long()
    probs = torch.as_tensor(d[Keys.PRED]["probs"])
    keep = labels != PatchLabel.NOLABEL
    d[Keys.PRED], d[Keys.LABEL] = probs[keep], labels[keep]
    return d


def _slide_batch(batchdata, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` of :class:`SlideEvaluator`: the slide item is the input (its patches are read by the
    inferer), there is no target tensor."""
    return batchdata, None


class SlideEvaluator(SupervisedEvaluator):
    """One slide per iteration through a slide inferer (:class:`~monai_wsi_ext.model.predict.CanvasInferer`):
    the evaluator of inference (``inference.json``) and of end-to-end validation alike.

    The input of an iteration is a slide item (:func:`~monai_wsi_ext.data.patches.slide_item`); ``pred`` is the
    inferer's output. A slide that fails (unreadable, no patches, ...) is recorded in ``state.failed`` (slide id
    -> reason) and, with ``on_failure="skip"``, the run goes on with the next slide; a dataset item with an
    ``error`` key (the slide could not even be prepared) is recorded the same way. An item with a ``skip`` reason
    (set by the dataset, or by a handler on ``ITERATION_STARTED``: e.g. the feature writer for a slide whose
    feature file is up to date) is not inferred: ``pred`` is None and ``skipped`` holds the reason. The slide's
    patch source is closed once its iteration and handlers are done.

    Args:
        device: compute device.
        val_data_loader: loader of slide items, ``batch_size=1``, ``collate_fn=slide_collate``.
        network: the canvas U-Net (the encoder in ``classifier`` mode); the inferer uses it.
        inferer: the slide inferer (a :class:`CanvasInferer`; end-to-end validation gives one over the current
            encoder and :func:`labelled_patches` as ``postprocessing``).
        postprocessing: post-transform of the output.
        on_failure: ``raise`` (validation: a slide that cannot be evaluated stops the run) or ``skip``
            (inference: record it and go on).
        kwargs: passed to MONAI's ``SupervisedEvaluator`` (key_val_metric, val_handlers, ...).
    """

    def __init__(self, device, val_data_loader, network, inferer, postprocessing=None, on_failure: str = "raise",
                 **kwargs):
        if on_failure not in ("raise", "skip"):
            raise ConfigError(f"`on_failure` must be 'raise' or 'skip', got {on_failure!r}.")
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, inferer=inferer,
                         prepare_batch=_slide_batch, postprocessing=postprocessing, **kwargs)
        self.on_failure = on_failure
        self.state.failed = {}
        # after the handlers given above (the writers may still read the slide, e.g. its thumbnail)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._close_slide)

    def _iteration(self, engine, batchdata):
        item = batchdata[0] if isinstance(batchdata, (list, tuple)) else batchdata
        sid = item.get("slide_id")
        try:
            if item.get("error"):
                raise MonaiWsiExtError(item["error"])
            if item.get("skip"):
                engine.state.output = {Keys.IMAGE: item, Keys.PRED: None, "skipped": item["skip"]}
                return engine.state.output
            return super()._iteration(engine, item)
        except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
            if self.on_failure == "raise":
                raise
            reason = str(e) if item.get("error") else f"{type(e).__name__}: {e}"
            engine.state.failed[sid] = reason
            logger.error("%s: inference failed, skipped (%s)", sid, reason)
            engine.state.output = {Keys.IMAGE: item, Keys.PRED: None, "failed": reason}
            return engine.state.output

    @staticmethod
    def _close_slide(engine) -> None:
        item = engine.state.batch[0] if isinstance(engine.state.batch, (list, tuple)) else engine.state.batch
        for key in ("patch_source", "prepared"):
            obj = item.get(key) if isinstance(item, dict) else None
            if obj is not None:
                obj.close()
