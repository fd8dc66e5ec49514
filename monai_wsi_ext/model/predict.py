"""The single prediction path of the method: encode patches, lay the features on the canvas, run the U-Net (sliding
window when the tissue is larger than the canvas) and gather per-patch probabilities back.

Training validation (:class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator`), the end-to-end step's first pass,
feature extraction, slide inference, the baselines, exported models and the Deploy application all call these
functions; nothing else encodes a slide or reads probabilities off a canvas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from monai_wsi_ext.model.canvas import canvas_forward, gather_from_canvas, layout_canvas, plan_canvases
from monai_wsi_ext.utils import module_device

__all__ = ["eval_mode", "encode_batches", "encode_slide", "append_prob_channel", "canvas_probabilities", "prob_grid",
           "CanvasInferer"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration of the block and restore every submodule's mode afterwards.

    The surrogate-loss step encodes each patch twice (once without gradients, once with) and needs both passes to
    produce identical features. In training mode batch norm normalises with the statistics of the current chunk
    (which differ from chunk to chunk and from the whole slide) and updates its running statistics between the
    passes, and dropout draws a new mask on each call; in eval mode every patch's feature is a fixed function of its
    pixels. The whole module is switched (not only the BatchNorm layers) so that no other train-only behaviour
    (dropout, auxiliary heads) can differ between the passes either. Inference uses the same context.

    Args:
        module: the network.

    Yields:
        ``module`` in eval mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def encode_batches(encoder: nn.Module, batches: Iterable[torch.Tensor], device=None, channels_last: bool = False,
                   with_probs: bool = False, autocast: bool = False, non_blocking: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode batches of transformed patches without gradients, in the order given.

    The encoder's mode is left as it is (wrap the call in :func:`eval_mode` for inference).

    Args:
        encoder: a module with ``features(x)`` (:class:`~monai_wsi_ext.model.networks.PatchEncoder`) or a plain
            module whose output is the feature vector.
        batches: ``(n, 3, h, w)`` float tensors.
        device: compute device (default: the encoder's).
        channels_last: NHWC inputs (about 2x faster on CPU for GoogLeNet when the encoder is NHWC too).
        with_probs: also the tumor probability of the encoder's classification head (``encoder.head``), the
            classifier-only baseline.
        autocast: run under ``torch.autocast`` (mixed precision; features returned as float32).
        non_blocking: non-blocking host-to-device copies.

    Returns:
        ``(features (N, C) on device, in the encoder's dtype (float32 under autocast), head probabilities (N,)
        float32 on the CPU or None)``.
    """
    dev, dtype = module_device(encoder, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    features = getattr(encoder, "features", encoder)
    head = getattr(encoder, "head", None) if with_probs else None
    # a runtime network (monai_wsi_ext.runtime.RuntimeNetwork) gives features and head logits in one call
    both = getattr(encoder, "features_and_logits", None) if with_probs else None
    feats, probs = [], []
    with torch.no_grad():
        for batch in batches:
            x = batch.to(device=dev, dtype=dtype, non_blocking=non_blocking).contiguous(memory_format=fmt)
            with torch.autocast(dev.type, enabled=autocast):
                if both is not None:
                    f, logits = both(x)
                    probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
                else:
                    f = features(x)
                    if head is not None:
                        probs.append(torch.softmax(head(f).float(), dim=1)[:, 1].cpu())
            feats.append(f.float() if autocast else f)
    if feats:
        x = torch.cat(feats)
    else:
        x = torch.zeros(0, int(getattr(encoder, "feature_dim", 0) or 0), device=dev, dtype=dtype)
    p = (torch.cat(probs) if probs else torch.zeros(0)) if with_probs else None
    return x, p


def encode_slide(encoder: nn.Module, source, batch_size: int = 64, device=None, channels_last: bool = True,
                 with_probs: bool = True, prefetch: int = 2) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode every patch of a slide in eval mode; reading runs ahead in a thread while the encoder computes.

    Args:
        encoder: patch encoder.
        source: a :class:`~monai_wsi_ext.data.patches.SlidePatchSource` (its eval transform is applied).
        batch_size: patches per encoder call.
        device: compute device (default: the encoder's).
        channels_last: NHWC inputs.
        with_probs: also the encoder head's tumor probabilities.
        prefetch: batches read ahead.

    Returns:
        ``(features (N, C) float32, tumor probabilities (N,) float32 or None)``.
    """
    with eval_mode(encoder):
        batches = (b for _, b in source.iter_batches(batch_size, prefetch=prefetch))
        x, p = encode_batches(encoder, batches, device, channels_last, with_probs)
    return x.float().cpu().numpy(), None if p is None else p.float().numpy()


def append_prob_channel(features: torch.Tensor, probs) -> torch.Tensor:
    """The per-patch canvas vectors of the ``canvas_prob_channel`` option: the (N, C) features with the encoder
    head's (N,) tumor probabilities appended as channel ``C`` (in the features' dtype and device).

    The canvas dataset (from the feature files' ``probs``) and inference (from :func:`encode_slide`'s head
    probabilities, computed the same way) both build the U-Net input with this function.

    Raises:
        ValueError: when ``probs`` does not hold one value per feature row.
    """
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs)
    p = p.to(device=features.device, dtype=features.dtype).reshape(-1, 1)
    if p.shape[0] != features.shape[0]:
        raise ValueError(f"`probs` must hold one probability per feature row ({features.shape[0]}), got {p.shape[0]}.")
    return torch.cat([features, p], dim=1)


def canvas_probabilities(unet: nn.Module, features, rows, cols, canvas_size: int, canvas_mode: str = "slide",
                         device=None, multiple: int = 16, tissue_components=None, inferer=None,
                         autocast: bool = False, class_index: int | None = 1, head_probs=None) -> np.ndarray:
    """Tumor probability of every patch from its features through the canvas U-Net, in eval mode.

    Layouts larger than ``canvas_size`` go through a sliding window (:func:`canvas_forward`), so no patch is cut.

    Args:
        unet: canvas U-Net.
        features: (N, C) patch features (array or tensor).
        rows, cols: (N,) grid coordinates.
        canvas_size: the U-Net's training canvas size.
        canvas_mode: ``slide`` or ``lumps`` (see :func:`~monai_wsi_ext.model.canvas.plan_canvases`).
        device: compute device (default: the U-Net's).
        multiple: rounding of layouts larger than ``canvas_size``.
        tissue_components: optional lump id per patch (``lumps`` mode).
        inferer: optional MONAI inferer for canvases larger than ``canvas_size``.
        autocast: mixed precision.
        class_index: the class whose probability is returned; None returns all classes.
        head_probs: optional (N,) encoder head tumor probabilities, appended to the features as the last canvas
            channel (the ``canvas_prob_channel`` option, see :func:`append_prob_channel`); the U-Net then has
            ``C + 1`` input channels.

    Returns:
        ``(N,)`` float32 probabilities of ``class_index`` (``(N, K)`` when None), NaN-free, in patch order.
    """
    dev, _ = module_device(unet, device)
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.to(device=dev, dtype=torch.float32 if not x.is_floating_point() else x.dtype)
    if head_probs is not None:
        x = append_prob_channel(x, head_probs)
    rows_t = torch.as_tensor(np.asarray(rows)).long().reshape(-1)
    cols_t = torch.as_tensor(np.asarray(cols)).long().reshape(-1)
    out: torch.Tensor | None = None
    with eval_mode(unet), torch.no_grad():
        for lay in plan_canvases(rows_t, cols_t, canvas_size, mode=canvas_mode, tissue_components=tissue_components,
                                 multiple=multiple):
            idx = lay.indices.long()
            canvas = layout_canvas(x[idx.to(dev)], lay)
            with torch.autocast(dev.type, enabled=autocast):
                logits = canvas_forward(unet, canvas, canvas_size, inferer=inferer)
            p = gather_from_canvas(torch.softmax(logits.float(), dim=0), lay.rows, lay.cols, lay.offset).cpu()
            if out is None:
                out = torch.full((len(rows_t), p.shape[1]), float("nan"))
            out[idx] = p
    if out is None:
        return np.zeros(0 if class_index is not None else (0, 0), np.float32)
    out_np = out.numpy().astype(np.float32)
    return out_np[:, class_index] if class_index is not None else out_np


def prob_grid(values: np.ndarray, rows, cols, shape: tuple[int, int]) -> np.ndarray:
    """Per-patch values laid on the ``(rows, cols)`` grid, NaN where there is no patch."""
    grid = np.full(tuple(shape), np.nan, np.float32)
    grid[np.asarray(rows, np.int64), np.asarray(cols, np.int64)] = values
    return grid


class CanvasInferer:
    """The method as a MONAI-style inferer over one slide item: encode every patch, lay the features on the canvas,
    run the U-Net (the ``network`` the evaluator passes) and gather per-patch probabilities.

    ``inferer(item, network)`` takes an item with ``patch_source`` (a
    :class:`~monai_wsi_ext.data.patches.SlidePatchSource`), ``rows`` and ``cols`` and returns ``{"probs": (N,)
    tumor probabilities, "features": (N, C), "head_probs": (N,) the encoder head's probabilities}`` (numpy,
    float32, patch-table order).

    Args:
        encoder: patch encoder (moved to ``channels_last`` here when asked).
        canvas_size: the U-Net's training canvas size.
        canvas_mode: ``slide`` or ``lumps``.
        batch_size: patches per encoder call (16 is fastest on a 2-core CPU, see BENCHMARKS.md).
        channels_last: NHWC encoder inputs.
        mode: ``canvas`` (encoder + U-Net) or ``classifier`` (the encoder head's probabilities straight onto the
            map, the classifier-only baseline; ``network`` is not used).
        multiple: rounding of layouts larger than ``canvas_size``.
        prefetch: batches read ahead of the encoder.
        prob_channel: the ``canvas_prob_channel`` option: the encoder head's tumor probability of each patch is
            appended to its features as canvas channel ``C`` (:func:`append_prob_channel`), as in the canvases the
            U-Net was trained on; the U-Net has ``C + 1`` input channels.
    """

    def __init__(self, encoder: nn.Module, canvas_size: int = 512, canvas_mode: str = "slide", batch_size: int = 64,
                 channels_last: bool = True, mode: str = "canvas", multiple: int = 16, prefetch: int = 2,
                 prob_channel: bool = False):
        if mode not in ("canvas", "classifier"):
            raise ValueError(f"`mode` must be 'canvas' or 'classifier', got {mode!r}.")
        self.encoder, self.canvas_size, self.canvas_mode = encoder, int(canvas_size), canvas_mode
        # ONNX runtimes take NCHW arrays (RuntimeNetwork.accepts_channels_last is False there)
        channels_last = bool(channels_last) and getattr(encoder, "accepts_channels_last", True)
        self.batch_size, self.channels_last, self.mode = int(batch_size), channels_last, mode
        self.multiple, self.prefetch, self.prob_channel = multiple, prefetch, bool(prob_channel)
        if channels_last:
            encoder.to(memory_format=torch.channels_last)

    def __call__(self, inputs: dict, network: nn.Module | None = None) -> dict:
        feats, head = encode_slide(self.encoder, inputs["patch_source"], self.batch_size,
                                   channels_last=self.channels_last, with_probs=True, prefetch=self.prefetch)
        if self.mode == "classifier":
            probs = head
        else:
            if network is None:
                raise ValueError("`mode='canvas'` needs the canvas U-Net as `network`.")
            probs = canvas_probabilities(network, feats, inputs["rows"], inputs["cols"], self.canvas_size,
                                         self.canvas_mode, multiple=self.multiple,
                                         head_probs=head if self.prob_channel else None)
        return {"probs": probs, "features": feats, "head_probs": head}
