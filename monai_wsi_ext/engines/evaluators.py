"""Slide-level validation (one slide per iteration) and the evaluators' post-transforms."""

from __future__ import annotations

import torch
from monai.engines import Evaluator
from monai.utils.enums import CommonKeys as Keys

from monai_wsi_ext.model.canvas import IGNORE_INDEX
from monai_wsi_ext.model.predict import canvas_probabilities, encode_slide
from monai_wsi_ext.prep.grid import PatchLabel

__all__ = ["tumor_probability", "labelled_cells", "SlideEvaluator"]


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


class SlideEvaluator(Evaluator):
    """Validation of encoder + canvas U-Net together, one slide per iteration: the current encoder encodes every
    patch, the U-Net runs over the whole grid (sliding window when larger than ``canvas_size``), and the output
    holds the labelled patches' tumor probabilities (``pred``) and labels (``label``) for patch-level metrics.

    Args:
        device: compute device.
        val_data_loader: loader over :class:`E2ESlideDataset` items (``augment=False``), ``batch_size=1``,
            ``collate_fn=slide_collate``.
        encoder: patch encoder.
        unet: canvas U-Net.
        canvas_size: the U-Net's canvas size.
        canvas_mode: ``slide`` or ``lumps``.
        batch_size: patches per encoder call.
        kwargs: passed to MONAI's ``Evaluator`` (key_val_metric, val_handlers, ...).
    """

    def __init__(self, device, val_data_loader, encoder, unet, canvas_size: int = 512, canvas_mode: str = "slide",
                 batch_size: int = 64, **kwargs):
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, **kwargs)
        self.encoder, self.unet = encoder, unet
        self.canvas_size, self.canvas_mode, self.batch_size = canvas_size, canvas_mode, batch_size

    def _iteration(self, engine, batchdata):
        item = batchdata[0] if isinstance(batchdata, (list, tuple)) else batchdata
        source = item["patch_source"]
        feats, _ = encode_slide(self.encoder, source, self.batch_size, engine.state.device, channels_last=False,
                                with_probs=False)
        probs = canvas_probabilities(self.unet, feats, item["rows"], item["cols"], self.canvas_size,
                                     self.canvas_mode, engine.state.device)
        labels = item["labels"].numpy()
        keep = labels != PatchLabel.NOLABEL
        return {Keys.PRED: torch.from_numpy(probs[keep]), Keys.LABEL: torch.from_numpy(labels[keep])}
