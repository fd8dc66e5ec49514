"""End-to-end training of encoder and canvas U-Net with the surrogate loss (Takahama et al. 2019, section 3.2.2).

One slide has far too many patches to back-propagate through the encoder at once. The step therefore runs in two
passes over the patches, in chunks of ``chunk_size``:

1. without gradients, encode every patch placed on the canvas and keep only the features ``x`` (N, C);
2. scatter ``x`` (a leaf that requires grad) onto the canvas, run the U-Net and the loss, and back-propagate: the
   U-Net's parameter gradients accumulate and ``g = dL/dx`` is read for every patch;
3. for each chunk again, re-load the same pixels, re-encode with gradients and back-propagate the surrogate loss
   ``L' = sum(g_chunk * x_chunk)``, whose gradient with respect to the encoder weights equals ``dL/dw_f``.

Memory then depends on ``chunk_size``, not on the number of patches. The gradients are exactly those of ordinary
back-propagation through the whole graph provided the second pass reproduces the first, which requires:

* the same pixels: ``load_patches(indices, seeds)`` must be a pure function of its arguments, so random
  augmentation is replayed from the per-patch seeds the step draws once per iteration;
* the encoder in eval mode during both passes (:func:`eval_mode`): batch-norm statistics computed over a
  chunk differ from those over another chunk composition (and from the whole slide), running-statistic updates
  would change the normalisation between the passes, and dropout would draw different masks.

:func:`e2e_step` is the numeric core (a pure function, tested for exactness in float64);
:class:`SurrogateE2ETrainer` wraps it in a MONAI/Ignite trainer, and :class:`StartValidationHandler` validates the
separate model it starts from, so that the best-model files are only replaced by an epoch that beats that start.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ignite.engine import Engine, Events
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils.enums import CommonKeys as Keys

from monai_wsi_ext.model.canvas import (
    IGNORE_INDEX,
    CanvasLayout,
    as_index,
    gather_from_canvas,
    layout_canvas,
    layout_label_canvas,
    plan_canvases,
    sample_window,
)
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.model.predict import encode_batches, eval_mode
from monai_wsi_ext.utils import module_device

__all__ = [
    "PatchLoader",
    "NonFiniteLossError",
    "draw_seeds",
    "encode_patches",
    "e2e_step",
    "slide_collate",
    "SurrogateE2ETrainer",
    "StartValidationHandler",
]

logger = logging.getLogger(__name__)

PatchLoader = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``load_patches(indices: LongTensor[n], seeds: LongTensor[n]) -> Tensor[n, 3, h, w]``; must return the same pixels
for the same (index, seed) pairs (augmentation replayed from the seed)."""

_SEED_HIGH = 2**31 - 1


class NonFiniteLossError(MonaiWsiExtError, FloatingPointError):
    """The canvas loss or its gradient was NaN/inf and the trainer was told to stop (``nonfinite="raise"``)."""


def draw_seeds(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmentation seed per patch (LongTensor (n,) in [0, 2**31 - 1)), drawn once per iteration."""
    return torch.randint(0, _SEED_HIGH, (int(n),), generator=generator, dtype=torch.long)


def _load(load_patches: PatchLoader, idx, seeds, device, dtype, non_blocking: bool) -> torch.Tensor:
    patches = load_patches(idx, seeds)
    if not isinstance(patches, torch.Tensor) or patches.ndim != 4 or patches.shape[0] != idx.numel():
        raise ValueError(
            f"`load_patches` must return a (n, C, h, w) tensor with n = {idx.numel()} patches, got "
            f"{tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__}."
        )
    if not patches.is_floating_point():
        raise TypeError(f"`load_patches` must return float pixels (normalised), got dtype {patches.dtype}.")
    return patches.to(device=device, dtype=dtype, non_blocking=non_blocking)


def encode_patches(
    encoder: nn.Module,
    load_patches: PatchLoader,
    indices: torch.Tensor,
    seeds: torch.Tensor,
    chunk_size: int = 64,
    device: str | torch.device | None = None,
    autocast: bool = False,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Encode patches in chunks without gradients (step 1 of the surrogate-loss step, and inference).

    Args:
        encoder: module with ``features(x)`` (a :class:`~monai_wsi_ext.model.networks.PatchEncoder`) or a plain module.
        load_patches: see :data:`PatchLoader`.
        indices: (M,) patch indices to encode, in this order.
        seeds: (M,) augmentation seeds, one per entry of ``indices``.
        chunk_size: patches per encoder call.
        device: compute device (default: the encoder's).
        autocast: run under ``torch.autocast`` (mixed precision).
        non_blocking: non-blocking host-to-device copies.

    Returns:
        (M, C) features on ``device`` (float32 under autocast, else the encoder's dtype).
    """
    if indices.numel() == 0:
        raise ValueError("`indices` is empty: there are no patches to encode.")
    dev, dtype = module_device(encoder, device)
    step = int(chunk_size)
    batches = (_load(load_patches, indices[s : s + step], seeds[s : s + step], dev, dtype, non_blocking)
               for s in range(0, indices.numel(), step))
    x, _ = encode_batches(encoder, batches, dev, autocast=autocast)
    return x


def _index(t, name: str, n: int | None = None) -> torch.Tensor:
    return as_index(t, name, n).cpu()


def _all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def e2e_step(
    encoder: nn.Module,
    unet: nn.Module,
    load_patches: PatchLoader,
    n_patches: int,
    rows,
    cols,
    labels,
    layouts: CanvasLayout | Sequence[CanvasLayout],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int = 64,
    subset: torch.Tensor | None = None,
    grad_scale: float = 1.0,
    seeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    autocast: bool = False,
    loss_scaler: Callable[[torch.Tensor], torch.Tensor] | None = None,
    encoder_grads: bool = True,
    freeze_encoder: bool = True,
    non_blocking: bool = False,
) -> dict[str, Any]:
    """One surrogate-loss end-to-end step on one slide: accumulate ``dL/dw`` of the U-Net and of the encoder.

    The gradients are added to the parameters' ``.grad`` (never zeroed, no optimizer step). They equal the gradients
    of ``loss * grad_scale`` back-propagated through ``encoder.features`` of all placed patches, the scatter onto the
    canvases, the U-Net and ``loss_fn`` in one graph (with the encoder in eval mode).

    Args:
        encoder: patch encoder with ``features(x)`` (or a plain module used as the feature function).
        unet: canvas network, ``(B, C, H, W) -> (B, K, H, W)`` logits.
        load_patches: ``load_patches(indices, seeds) -> (n, 3, h, w)``; called twice for every chunk (once per pass)
            with identical arguments, and must return identical pixels.
        n_patches: patches in the slide's table (length of ``rows``/``cols``/``labels``).
        rows: (n_patches,) grid rows.
        cols: (n_patches,) grid columns.
        labels: (n_patches,) 1 tumor, 0 normal, -1 nolabel.
        layouts: one layout or a list of layouts of equal size (e.g. the lumps of a biopsy slide, or training windows
            from :func:`~monai_wsi_ext.model.canvas.sample_window`); they are stacked into one U-Net batch. Only the
            patches of the layouts are encoded.
        loss_fn: ``loss_fn(logits (B, K, H, W), targets (B, H, W) with IGNORE_INDEX) -> scalar``.
        chunk_size: patches per encoder call in both passes.
        subset: optional patch indices whose encoder gradients are used; the other placed patches still feed the
            U-Net but their features act as constants for the encoder update (the encoder gradient is the partial
            sum over the subset, not rescaled). Only subset patches are re-encoded in the second pass.
        grad_scale: factor on the loss before back-propagation (e.g. ``1 / accumulation_steps``).
        seeds: optional (n_patches,) augmentation seed per patch; drawn from ``generator`` when None.
        generator: random generator for the seeds.
        device: compute device (default: the encoder's).
        autocast: run the networks under ``torch.autocast`` (the features and ``g`` are kept in float32).
        loss_scaler: optional callable applied to the scaled loss before back-propagation (``GradScaler.scale``).
        encoder_grads: False skips the second pass (trains the U-Net only, on features computed on the fly).
        freeze_encoder: run the encoder in eval mode (:func:`eval_mode`); required for exactness.
        non_blocking: non-blocking host-to-device copies.

    Returns:
        dict with ``loss`` (detached scalar tensor, unscaled), ``finite`` (bool), ``nonfinite_reason`` (None,
        ``"loss"`` or ``"grad"``), ``skipped`` (True when no labelled cell was on the canvases: nothing computed),
        ``n_used`` (patches on the canvases), ``n_labeled`` (labelled cells), ``n_encoder_grad`` (patches re-encoded
        with gradients), ``used_indices`` (the placed patch indices, sorted), ``features`` and ``feature_grad``
        ((n_used, C), detached, ``feature_grad`` = ``dL/dx`` times the scales), ``canvas`` and ``logits`` (detached
        U-Net input and output), ``targets`` (label canvases), ``layouts`` and ``seeds``. When ``finite`` is False
        no gradient was added (the U-Net gradients are only accumulated after the finiteness check).

    Raises:
        ValueError: for inconsistent inputs (lengths, layouts of different sizes).
    """
    n_patches = int(n_patches)
    rows, cols, labels, layouts, chunk_size = _check_step_inputs(n_patches, rows, cols, labels, layouts, chunk_size)
    seeds = draw_seeds(n_patches, generator) if seeds is None else _index(seeds, "seeds", n_patches)
    dev, _ = module_device(encoder, device)
    used = _placed_patches(layouts, n_patches)
    targets = torch.stack([layout_label_canvas(labels, lay) for lay in layouts]).to(dev)
    result = _new_step_result(used, layouts, seeds, targets)
    if result["n_labeled"] == 0 or used.numel() == 0:
        result["skipped"] = True
        return result

    freeze = eval_mode(encoder) if freeze_encoder else nullcontext()
    amp = torch.autocast(dev.type, enabled=autocast) if autocast else nullcontext()
    with freeze:
        x, x_leaf, canvas = _first_pass(
            encoder, load_patches, used, seeds, layouts, chunk_size, dev, autocast, non_blocking
        )
        g = _unet_backward(unet, canvas, targets, loss_fn, x_leaf, grad_scale, loss_scaler, amp, result)
        if not result["finite"]:  # non-finite loss or gradient: nothing was accumulated
            return result
        result.update(features=x.detach(), feature_grad=g.detach())
        if not encoder_grads:
            return result
        result["n_encoder_grad"] = _surrogate_pass(
            encoder, load_patches, used, seeds, g, subset, chunk_size, dev, amp, non_blocking
        )
    return result


def _check_step_inputs(
    n_patches: int, rows, cols, labels, layouts, chunk_size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[CanvasLayout], int]:
    """Validate :func:`e2e_step`'s slide table, layouts and chunk size; return them normalised (CPU index tensors,
    a list of layouts, an int chunk size)."""
    rows = _index(rows, "rows", n_patches)
    cols = _index(cols, "cols", n_patches)
    labels = _index(labels, "labels", n_patches)
    layouts = [layouts] if isinstance(layouts, CanvasLayout) else list(layouts)
    if not layouts:
        raise ValueError("`layouts` is empty; plan the canvases with `plan_canvases` first.")
    sizes = {tuple(lay.size) for lay in layouts}
    if len(sizes) != 1:
        raise ValueError(f"all `layouts` must have the same size to share a U-Net batch, got sizes {sorted(sizes)}.")
    if int(chunk_size) < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    return rows, cols, labels, layouts, int(chunk_size)


def _placed_patches(layouts: Sequence[CanvasLayout], n_patches: int) -> torch.Tensor:
    """The sorted, unique patch indices placed on ``layouts`` (CPU LongTensor), checked against ``n_patches``."""
    used = torch.unique(torch.cat([lay.indices.long().cpu() for lay in layouts]))  # sorted
    if used.numel() and (int(used[0]) < 0 or int(used[-1]) >= n_patches):
        raise ValueError(f"layout indices must lie in [0, {n_patches}), got range [{int(used[0])}, {int(used[-1])}].")
    return used


def _new_step_result(used: torch.Tensor, layouts: list[CanvasLayout], seeds: torch.Tensor,
                     targets: torch.Tensor) -> dict[str, Any]:
    """:func:`e2e_step`'s result before anything is computed (NaN loss, finite, not skipped)."""
    return {
        "loss": torch.tensor(float("nan")),
        "finite": True,
        "nonfinite_reason": None,
        "skipped": False,
        "n_used": int(used.numel()),
        "n_labeled": int((targets != IGNORE_INDEX).sum()),
        "n_encoder_grad": 0,
        "used_indices": used,
        "layouts": layouts,
        "seeds": seeds,
        "targets": targets,
    }


def _first_pass(
    encoder: nn.Module,
    load_patches: PatchLoader,
    used: torch.Tensor,
    seeds: torch.Tensor,
    layouts: list[CanvasLayout],
    chunk_size: int,
    dev: torch.device,
    autocast: bool,
    non_blocking: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1 and 2: encode every placed patch without a graph, then scatter a leaf copy of the features onto the
    canvases (differentiably). Returns the features ``x``, the leaf ``x_leaf`` and the stacked canvases."""
    x = encode_patches(encoder, load_patches, used, seeds[used], chunk_size, dev, autocast, non_blocking)
    x_leaf = x.detach().requires_grad_(True)
    canvases = []
    for lay in layouts:
        pos = torch.searchsorted(used, lay.indices.long().cpu()).to(dev)
        canvases.append(layout_canvas(x_leaf[pos], lay))
    return x, x_leaf, torch.stack(canvases)


def _unet_backward(
    unet: nn.Module,
    canvas: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_leaf: torch.Tensor,
    grad_scale: float,
    loss_scaler: Callable[[torch.Tensor], torch.Tensor] | None,
    amp,
    result: dict[str, Any],
) -> torch.Tensor | None:
    """Step 3: U-Net forward, loss and backward; accumulate the U-Net's gradients and return ``g = dL/dx``.

    Records ``loss``, ``canvas`` and ``logits`` in ``result``. On a non-finite loss or gradient it records
    ``finite=False`` and the reason in ``result``, adds no gradient and returns None.
    """
    with amp:
        logits = unet(canvas)
        loss = loss_fn(logits, targets)
    result.update(loss=loss.detach().float(), canvas=canvas.detach(), logits=logits.detach())
    if not bool(torch.isfinite(loss.detach())):
        result.update(finite=False, nonfinite_reason="loss")
        return None
    scaled = loss * grad_scale
    if loss_scaler is not None:
        scaled = loss_scaler(scaled)
    params = [p for p in unet.parameters() if p.requires_grad]
    grads = torch.autograd.grad(scaled, [x_leaf, *params], allow_unused=True)
    if not _all_finite(grads):
        result.update(finite=False, nonfinite_reason="grad")
        return None
    for p, gp in zip(params, grads[1:]):
        if gp is not None:
            p.grad = gp if p.grad is None else p.grad.add_(gp)
    return grads[0]


def _surrogate_pass(
    encoder: nn.Module,
    load_patches: PatchLoader,
    used: torch.Tensor,
    seeds: torch.Tensor,
    g: torch.Tensor,
    subset: torch.Tensor | None,
    chunk_size: int,
    dev: torch.device,
    amp,
    non_blocking: bool,
) -> int:
    """Step 4: re-encode the (subset of the) placed patches chunk by chunk with gradients and back-propagate the
    surrogate loss ``<g, x>`` into the encoder. Returns the number of patches re-encoded."""
    positions = torch.arange(used.numel())
    if subset is not None:
        positions = positions[torch.isin(used, _index(subset, "subset"))]
    feats = getattr(encoder, "features", encoder)
    enc_dtype = module_device(encoder, dev)[1]
    for start in range(0, positions.numel(), chunk_size):
        pos = positions[start : start + chunk_size]
        idx = used[pos]
        patches = _load(load_patches, idx, seeds[idx], dev, enc_dtype, non_blocking)
        with amp:
            xc = feats(patches)
        (g[pos.to(dev)] * xc.to(g.dtype)).sum().backward()
    return int(positions.numel())


def slide_collate(batch: Sequence[Any]) -> Any:
    """DataLoader ``collate_fn`` for ``batch_size=1`` over slides: returns the single item unchanged.

    Raises:
        ConfigError: when the batch holds more than one slide.
    """
    if len(batch) != 1:
        raise ConfigError(f"the end-to-end trainer takes one slide per iteration; use batch_size=1, got {len(batch)}.")
    return batch[0]


class SurrogateE2ETrainer(Trainer):
    """End-to-end training of encoder and canvas U-Net, one slide per iteration, with the surrogate loss.

    Each item of ``train_data_loader`` (use ``batch_size=1, collate_fn=slide_collate``) is a dict with
    ``"patch_source"`` (an object with ``load(indices, seeds) -> Tensor[n, 3, h, w]`` returning the same pixels
    for the same arguments, and ``__len__``), ``"rows"``, ``"cols"``, ``"labels"`` (LongTensors over the slide's
    patches) and optionally ``"layout"`` (one :class:`CanvasLayout` or a list) and ``"tissue_components"``.
    Without a layout the canvases are planned with :func:`plan_canvases`; layouts that are not ``canvas_size``
    square are replaced by a random window (anchored on a labelled patch when there is one).

    ``engine.state.output`` holds ``image`` (the detached feature canvases, (B, C, S, S)), ``pred`` (the U-Net's
    per-patch class-1 probabilities of the labelled patches on the canvases; (n, K) probabilities when K > 2),
    ``label`` (their labels, 0/1), ``loss`` (detached scalar; NaN when the iteration contributed nothing),
    ``patch_index`` (their indices) and ``n_labeled``. ``IterationEvents`` FORWARD_COMPLETED, LOSS_COMPLETED and
    BACKWARD_COMPLETED fire after the step's gradients are in place (before the optimizer steps),
    MODEL_COMPLETED at the end. Counters: ``engine.state.nonfinite_skipped`` (NaN/inf loss or gradient, skipped),
    ``engine.state.empty_skipped`` (no labelled patch on the canvases), ``engine.state.amp_overflow_skipped``
    (mixed-precision gradient overflow; the scale is backed off).

    Args:
        device: compute device; the networks must already be on it.
        max_epochs: epochs to run.
        train_data_loader: iterable of slide dicts (see above).
        encoder: patch encoder (``features(x)``); kept in eval mode during the step (see :func:`eval_mode`).
        unet: canvas U-Net; in train mode during the step.
        encoder_optimizer: optimizer of the encoder; None trains the U-Net only (the second pass is skipped).
        unet_optimizer: optimizer of the U-Net.
        loss_function: canvas loss (``CrossEntropyLoss(ignore_index=IGNORE_INDEX)`` when None).
        chunk_size: patches per encoder call.
        canvas_size: training canvas side; must be divisible by the U-Net's total downsampling.
        canvas_mode: ``"slide"`` or ``"lumps"`` (see :func:`plan_canvases`).
        canvas_multiple: rounding of layouts larger than ``canvas_size``.
        subset_size: K random placed patches per slide whose encoder gradients are used (None: all).
        accumulation_steps: optimizer steps every n slides (gradients averaged over them); zeroed after the step.
        nonfinite: ``"skip"`` (count and go on) or ``"raise"`` (:class:`NonFiniteLossError`).
        seed: seed of the trainer's generator (windows, subsets, augmentation seeds).
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        non_blocking: non-blocking host-to-device copies.
        iteration_update: replaces :meth:`_iteration` when given.
        postprocessing: MONAI post transforms on the output.
        key_train_metric: Ignite metric(s) on ``pred``/``label``.
        additional_metrics: more metrics.
        metric_cmp_fn: compares key metric values.
        train_handlers: MONAI/Ignite handlers.
        amp: mixed precision (CUDA only; ignored with a warning on CPU).
        event_names: extra events.
        event_to_attr: event-to-state attribute map.
        decollate: False (default): ``engine.state.output`` is the dict above (read the loss with
            ``lambda x: x["loss"]``). True: a one-element list holding that dict, like MONAI's decollated batch of
            one, so that bundle expressions such as ``from_engine(["loss"], first=True)`` work; the list is set just
            before MODEL_COMPLETED (handlers of the earlier events see the dict).
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        amp_kwargs: extra ``torch.autocast`` arguments (unused; autocast runs with defaults).
        prob_channel: the ``canvas_prob_channel`` option (the encoder head's probability as an extra canvas
            channel). Not supported end to end: True raises :class:`ConfigError` here, before training (the surrogate
            step would also have to route ``dL/dp`` through the head into the features and decide whether the head
            trains; the U-Net of a prob-channel run is trained with ``train_canvas.json`` only).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader,
        encoder: nn.Module,
        unet: nn.Module,
        encoder_optimizer: torch.optim.Optimizer | None,
        unet_optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        chunk_size: int = 64,
        canvas_size: int = 512,
        canvas_mode: str = "slide",
        canvas_multiple: int = 16,
        subset_size: int | None = None,
        accumulation_steps: int = 1,
        nonfinite: str = "skip",
        seed: int = 0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = False,
        amp_kwargs: dict | None = None,
        prob_channel: bool = False,
    ) -> None:
        self._check_options(
            unet, chunk_size, canvas_size, canvas_mode, subset_size, accumulation_steps, nonfinite, prob_channel
        )
        dev = torch.device(device)
        amp = self._amp_available(amp, dev)
        super().__init__(
            device=dev,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,  # per-slide outputs are wrapped, not split along their first dimension
            amp_kwargs=amp_kwargs,
        )
        self.decollate = bool(decollate)
        self._set_components(encoder, unet, encoder_optimizer, unet_optimizer, loss_function)
        self.chunk_size = int(chunk_size)
        self.canvas_size = int(canvas_size)
        self.canvas_mode = canvas_mode
        self.canvas_multiple = int(canvas_multiple)
        self.subset_size = None if subset_size is None else int(subset_size)
        self.accumulation_steps = int(accumulation_steps)
        self.nonfinite = nonfinite
        self.optim_set_to_none = optim_set_to_none
        self.generator = torch.Generator().manual_seed(int(seed))
        self._window_has_grads = False
        self.state.nonfinite_skipped = 0
        self.state.empty_skipped = 0
        self.state.amp_overflow_skipped = 0

    # -- construction ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check_options(
        unet: nn.Module, chunk_size, canvas_size, canvas_mode, subset_size, accumulation_steps, nonfinite, prob_channel
    ) -> None:
        """Refuse unsupported or inconsistent options (:class:`ConfigError`) before anything is built."""
        if prob_channel:
            raise ConfigError(
                "`canvas_prob_channel: true` is not supported by end-to-end training (train_e2e.json): the surrogate "
                "step lays the encoder features alone on the canvas. Train the prob-channel U-Net with "
                "train_canvas.json only, or run train_e2e.json with `--canvas_prob_channel false` and a U-Net "
                "trained without the channel."
            )
        if int(chunk_size) < 1:
            raise ConfigError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        if int(accumulation_steps) < 1:
            raise ConfigError(f"`accumulation_steps` must be >= 1, got {accumulation_steps}.")
        if nonfinite not in ("skip", "raise"):
            raise ConfigError(f"`nonfinite` must be 'skip' or 'raise', got {nonfinite!r}.")
        if canvas_mode not in ("slide", "lumps"):
            raise ConfigError(f"`canvas_mode` must be 'slide' or 'lumps', got {canvas_mode!r}.")
        if subset_size is not None and int(subset_size) < 1:
            raise ConfigError(f"`subset_size` must be None or >= 1, got {subset_size}.")
        strides = getattr(unet, "strides", None)
        if strides:
            down = math.prod(int(s) for s in strides)
            if int(canvas_size) % down:
                raise ConfigError(
                    f"`canvas_size` must be divisible by {down} (the U-Net's downsampling), got {canvas_size}."
                )

    @staticmethod
    def _amp_available(amp: bool, dev: torch.device) -> bool:
        """``amp``, or False with a warning (to the trainer's caller) when ``dev`` is not a CUDA device."""
        if amp and dev.type != "cuda":
            # stacklevel 3: the warning points at the code that builds the trainer, as it did from ``__init__``
            warnings.warn(f"`amp=True` needs a CUDA device, got {dev}; mixed precision is disabled.", stacklevel=3)
            amp = False
        return amp

    def _set_components(self, encoder, unet, encoder_optimizer, unet_optimizer, loss_function) -> None:
        """Networks, optimizers and loss, under their own names and the generic ones MONAI handlers look for."""
        self.encoder = encoder
        self.unet = unet
        self.network = unet  # what generic handlers and bundle properties look for
        self.encoder_optimizer = encoder_optimizer
        self.unet_optimizer = unet_optimizer
        self.optimizer = unet_optimizer
        if loss_function is None:
            loss_function = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.loss_function = loss_function

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Ignite's ``load_state_dict`` (resuming), tolerant of a checkpoint that lacks some of the
        ``state_dict_user_keys`` (one written before they were recorded, e.g. :class:`StartValidationHandler`'s):
        those are set to None with a warning instead of failing the resume."""
        missing = [k for k in self.state_dict_user_keys if k not in state_dict]
        if missing:
            self.logger.warning("resume: the checkpoint does not record %s (written by an older version); set to None",
                                missing)
            state_dict = {**state_dict, **dict.fromkeys(missing)}
        super().load_state_dict(state_dict)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.encoder_optimizer, self.unet_optimizer) if o is not None]

    def _zero_grad(self) -> None:
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=self.optim_set_to_none)

    def _step(self) -> None:
        for opt in self._optimizers():
            if not any(p.grad is not None for group in opt.param_groups for p in group["params"]):
                continue
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()

    def _accumulation_flags(self, engine) -> tuple[bool, bool]:
        acc = self.accumulation_steps
        if acc == 1:
            return True, True
        epoch_length = engine.state.epoch_length
        if epoch_length is not None:
            local = (engine.state.iteration - 1) % epoch_length
            return local % acc == 0, (local + 1) % acc == 0 or (local + 1) == epoch_length
        local = engine.state.iteration - 1
        return local % acc == 0, (local + 1) % acc == 0

    def _layouts(self, item: dict, rows, cols, labels) -> list[CanvasLayout]:
        given = item.get("layout")
        if given is None:
            layouts = plan_canvases(
                rows,
                cols,
                self.canvas_size,
                mode=self.canvas_mode,
                tissue_components=item.get("tissue_components"),
                multiple=self.canvas_multiple,
            )
        else:
            layouts = [given] if isinstance(given, CanvasLayout) else list(given)
        out = []
        for lay in layouts:
            if len(lay) == 0:
                continue
            weights = (labels[lay.indices.long()] >= 0).double()
            out.append(sample_window(lay, self.canvas_size, self.generator, weights=weights))
        return out

    @staticmethod
    def _unpack(batchdata) -> dict:
        if isinstance(batchdata, (list, tuple)) and len(batchdata) == 1:
            batchdata = batchdata[0]
        if not isinstance(batchdata, dict):
            raise ConfigError(
                f"each batch must be one slide dict (use batch_size=1, collate_fn=slide_collate), got "
                f"{type(batchdata).__name__}."
            )
        missing = [k for k in ("patch_source", "rows", "cols", "labels") if k not in batchdata]
        if missing:
            raise ConfigError(f"slide dict lacks keys {missing}; it has {sorted(batchdata)}.")
        return batchdata

    def _patch_outputs(self, result: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = result.get("logits")
        if logits is None:
            empty = torch.zeros(0)
            return empty, empty.long(), empty.long(), torch.tensor(float("nan"))
        probs = torch.softmax(logits.float(), dim=1)
        preds, labs, idxs = [], [], []
        for b, lay in enumerate(result["layouts"]):
            p = gather_from_canvas(probs[b], lay.rows, lay.cols, lay.offset)
            t = gather_from_canvas(result["targets"][b].unsqueeze(0), lay.rows, lay.cols, lay.offset)[:, 0]
            keep = t != IGNORE_INDEX
            preds.append(p[keep])
            labs.append(t[keep])
            idxs.append(lay.indices.to(keep.device)[keep])
        pred = torch.cat(preds)
        if pred.shape[1] == 2:
            pred = pred[:, 1]
        return pred, torch.cat(labs), torch.cat(idxs), result["loss"]

    # -- the iteration ---------------------------------------------------------------------------------------------

    def _iteration(self, engine: SurrogateE2ETrainer, batchdata) -> dict:
        """One slide: plan/sample canvases, run :func:`e2e_step`, step the optimizers at the end of a window.

        Args:
            engine: this trainer.
            batchdata: one slide dict (see the class docstring).

        Returns:
            ``engine.state.output``.

        Raises:
            NonFiniteLossError: on a NaN/inf loss or gradient when ``nonfinite="raise"``.
        """
        if batchdata is None:
            raise ConfigError("Must provide batch data for current iteration.")
        item = self._unpack(batchdata)
        source = item["patch_source"]
        n = len(source)
        rows = _index(item["rows"], "rows", n)
        cols = _index(item["cols"], "cols", n)
        labels = _index(item["labels"], "labels", n)
        layouts = self._layouts(item, rows, cols, labels)
        subset = self._draw_subset(layouts)

        should_step = self._start_window(engine)
        engine.unet.train()
        result = self._surrogate_step(engine, source, n, rows, cols, labels, layouts, subset)
        self._publish_outputs(engine, result)
        self._record_outcome(engine, result)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        if should_step:
            self._end_window()
        if self.decollate:
            engine.state.output = [engine.state.output]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _draw_subset(self, layouts: list[CanvasLayout]) -> torch.Tensor | None:
        """``subset_size`` random placed patches whose encoder gradients are used, or None for all of them."""
        if self.subset_size is None or self.encoder_optimizer is None or not layouts:
            return None
        used = torch.unique(torch.cat([lay.indices.long() for lay in layouts]))
        if used.numel() > self.subset_size:
            return used[torch.randperm(used.numel(), generator=self.generator)[: self.subset_size]]
        return None

    def _start_window(self, engine: SurrogateE2ETrainer) -> bool:
        """Zero the gradients at the start of an accumulation window; return whether this iteration ends one."""
        should_zero, should_step = self._accumulation_flags(engine)
        if should_zero:
            self._zero_grad()
            self._window_has_grads = False
        return should_step

    def _end_window(self) -> None:
        """Step the optimizers when the window accumulated gradients, then zero them for the next window."""
        if self._window_has_grads:
            self._step()
        self._zero_grad()
        self._window_has_grads = False

    def _surrogate_step(self, engine: SurrogateE2ETrainer, source, n: int, rows, cols, labels,
                        layouts: list[CanvasLayout], subset: torch.Tensor | None) -> dict:
        """:func:`e2e_step` on the slide with the trainer's settings (a skipped result when there is no layout)."""
        if not layouts:
            return {"skipped": True, "finite": True, "loss": torch.tensor(float("nan")), "n_labeled": 0}
        return e2e_step(
            engine.encoder,
            engine.unet,
            source.load,
            n,
            rows,
            cols,
            labels,
            layouts,
            engine.loss_function,
            chunk_size=self.chunk_size,
            subset=subset,
            grad_scale=1.0 / self.accumulation_steps,
            generator=self.generator,
            device=engine.state.device,
            autocast=bool(engine.amp),
            loss_scaler=engine.scaler.scale if engine.scaler is not None else None,
            encoder_grads=self.encoder_optimizer is not None,
            non_blocking=engine.non_blocking,
        )

    def _publish_outputs(self, engine: SurrogateE2ETrainer, result: dict) -> None:
        """Set ``engine.state.output`` from the step's result; fire FORWARD_COMPLETED, add the loss, fire
        LOSS_COMPLETED."""
        pred, lab, idx, loss = self._patch_outputs(result)
        engine.state.output = {
            Keys.IMAGE: result.get("canvas"),
            Keys.LABEL: lab,
            Keys.PRED: pred,
            "patch_index": idx,
            "n_labeled": result["n_labeled"],
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

    def _record_outcome(self, engine: SurrogateE2ETrainer, result: dict) -> None:
        """Count a non-finite or empty slide, or mark the window as holding gradients."""
        if not result["finite"]:
            self._handle_nonfinite(engine, result)
        elif result["skipped"]:
            engine.state.empty_skipped += 1
            engine.logger.debug("iteration %d: no labelled patch on the canvas, skipped", engine.state.iteration)
        else:
            self._window_has_grads = True

    def _handle_nonfinite(self, engine: SurrogateE2ETrainer, result: dict) -> None:
        """A NaN/inf loss or gradient: back off the AMP scale on an overflow (finite loss under a scaler), else raise
        (``nonfinite="raise"``) or count and skip the slide."""
        loss_ok = bool(torch.isfinite(result["loss"]))
        if engine.scaler is not None and loss_ok:
            engine.scaler.update(engine.scaler.get_scale() * engine.scaler.get_backoff_factor())
            engine.state.amp_overflow_skipped += 1
            engine.logger.info(
                "iteration %d: mixed-precision gradient overflow, scale backed off", engine.state.iteration
            )
        elif self.nonfinite == "raise":
            raise NonFiniteLossError(
                f"iteration {engine.state.iteration}: non-finite {result['nonfinite_reason']} "
                f"(loss {float(result['loss'])}); set nonfinite='skip' to skip such slides."
            )
        else:
            engine.state.nonfinite_skipped += 1
            engine.logger.warning(
                "iteration %d: non-finite %s (loss %s), slide skipped (%d so far)",
                engine.state.iteration,
                result["nonfinite_reason"],
                float(result["loss"]),
                engine.state.nonfinite_skipped,
            )


class StartValidationHandler:
    """Validate the separate model end-to-end training starts from, so that no end-to-end epoch that validates worse
    than it is ever saved as the best model.

    Attach it to the trainer (list it in ``train_handlers`` next to MONAI's ``ValidationHandler``, with the same
    ``validator``). Before the first epoch it runs ``validator.run(0)``: the validator's best-model
    ``CheckpointSaver`` s write the starting model under their file names (``encoder_e2e.pt``, ``unet_e2e.pt``) and
    record its key metric, and ``validator.state.best_metric`` becomes that score with ``best_metric_epoch`` 0. An
    epoch's model replaces those files only when its key metric is strictly better than the best so far (the rule of
    the savers and of ``metric_cmp_fn``), so the files never hold a model that validates worse than the start; when no
    epoch beats it they hold the starting model, and the run ends with a warning saying so. The networks in memory
    hold the last epoch's weights in either case.

    The start is validated on ``EPOCH_STARTED`` of epoch 1 rather than on ``STARTED``: a resumable checkpoint is
    loaded on ``STARTED`` by a handler attached after this one, and a resumed run (which starts at a later epoch) must
    neither validate the start again nor replace the best-model files with it; it keeps the savers' and validator's
    record from the checkpoint (:class:`~monai_wsi_ext.engines.checkpoints.ResumeState`).

    Trainer state, saved in the resumable checkpoint (``state_dict_user_keys``): ``start_metric`` (the starting
    model's key metric; None until it is validated, or after resuming a checkpoint that lacks the record),
    ``best_val_metric`` and ``best_val_epoch`` (the best validation so far, 0 = the starting model; None before any
    validation).

    Args:
        validator: the validation engine, with a key metric (``key_val_metric``).
        checkpoints: the best-model file names, for the log lines.

    Raises:
        ConfigError: when ``validator`` has no key metric.
    """

    STATE_KEYS = ("start_metric", "best_val_metric", "best_val_epoch")

    def __init__(self, validator: Evaluator, checkpoints: Sequence[str] = ()) -> None:
        if getattr(validator.state, "key_metric_name", None) is None:
            raise ConfigError("StartValidationHandler needs a validator with a key metric (`key_val_metric`).")
        self.validator = validator
        self.checkpoints = [str(c) for c in checkpoints]
        self.scores: dict[int, float] = {}  # validated epoch -> key metric, this run
        self.trainer: Engine | None = None

    @property
    def key_metric_name(self) -> str:
        return self.validator.state.key_metric_name

    def _files(self) -> str:
        return ", ".join(self.checkpoints) or "the best-model files"

    def attach(self, engine: Engine) -> None:
        """Validate the start before epoch 1 of ``engine``, track the validations, log the outcome at the end."""
        self.trainer = engine
        for key in self.STATE_KEYS:
            if key not in engine.state_dict_user_keys:
                engine.state_dict_user_keys.append(key)
            if not hasattr(engine.state, key):
                setattr(engine.state, key, None)
        engine.add_event_handler(Events.EPOCH_STARTED(once=1), self.validate_start)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        self.validator.add_event_handler(Events.COMPLETED, self._record)

    def validate_start(self, engine: Engine) -> None:
        """Run the validation on the starting model (validator epoch 0) and record its score."""
        self.validator.run(0)
        engine.state.start_metric = float(self.validator.state.metrics[self.key_metric_name])
        engine.logger.info(
            "end-to-end start: the starting (separate) model validates %s %.4f (epoch 0); %s hold it until an "
            "epoch beats it", self.key_metric_name, engine.state.start_metric, self._files())

    def _sync(self, engine: Engine) -> None:
        """Copy the validator's best metric and epoch (restored too when resuming) into ``engine.state``."""
        vst = self.validator.state
        if getattr(vst, "best_metric_epoch", -1) >= 0:
            engine.state.best_val_metric = float(vst.best_metric)
            engine.state.best_val_epoch = int(vst.best_metric_epoch)

    def _record(self, validator: Engine) -> None:
        if self.trainer is None:
            return
        self.scores[int(validator.state.epoch)] = float(validator.state.metrics[self.key_metric_name])
        self._sync(self.trainer)

    def completed(self, engine: Engine) -> None:
        """Log the best epoch against the start, or that no epoch beat the start."""
        self._sync(engine)
        st = engine.state
        name = self.key_metric_name
        start = "not recorded" if st.start_metric is None else f"{st.start_metric:.4f}"
        if st.best_val_epoch is None:
            engine.logger.warning("end-to-end training: no validation was run; %s were not written", self._files())
        elif st.best_val_epoch == 0:
            tried = {e: s for e, s in self.scores.items() if e > 0}
            best = max(tried, key=tried.get) if tried else None
            detail = (f"best end-to-end epoch {best}: {tried[best]:.4f}" if best is not None
                      else "no end-to-end epoch was validated")
            engine.logger.warning(
                "end-to-end training: no epoch beat the starting (separate) model on %s (start %s, %s); %s hold the "
                "starting model", name, start, detail, self._files())
        else:
            engine.logger.info("end-to-end training: best epoch %d, %s %.4f against %s at the start; saved to %s",
                               st.best_val_epoch, name, st.best_val_metric, start, self._files())
