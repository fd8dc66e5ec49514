"""Distributed end-to-end training (``multi_gpu_train_e2e.json``): every rank runs the two-pass surrogate step
(:func:`~monai_wsi_ext.engines.e2e.e2e_step`) on its own slides, and the encoder's and U-Net's gradients are
averaged over the ranks with one all-reduce before the optimisers step.

Why not ``DistributedDataParallel``: the step computes the U-Net's gradients with ``torch.autograd.grad`` (to read
``dL/dx`` at the same time) and the encoder's with one ``backward`` per chunk of the second pass, through
``encoder.features`` rather than ``forward``. DDP's reducer would fire on every one of those backward calls (or not
at all for ``autograd.grad``), and ``no_sync`` around all but the last would still tie the all-reduce to whichever
backward happens to come last. Here the gradients of the whole accumulation window are summed locally, exactly as in
one process, and reduced once per optimiser step: one flat buffer (all gradients, a "has a gradient" flag per
parameter and the window's "has gradients" flag) and one ``all_reduce``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from monai_wsi_ext.engines.e2e import SurrogateE2ETrainer
from monai_wsi_ext.errors import ConfigError

__all__ = ["DistributedE2ETrainer", "average_gradients", "broadcast_parameters"]


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_parameters(modules, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``modules`` to every rank (what DDP does when it wraps a
    network), so that all ranks start from the same weights."""
    if not _group_ready() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, src=src)


def average_gradients(params, has_grads: bool) -> bool:
    """Average the ``.grad`` of ``params`` over the ranks in place, with one ``all_reduce``.

    A parameter without a gradient on a rank counts as a zero gradient there (e.g. a rank whose slide had no
    labelled patch, or a non-finite one that was skipped), so the mean is the sum over all ranks' slides divided by
    the number of ranks: the gradient one process would accumulate over the same slides with ``accumulation_steps``
    times the number of ranks. A parameter that has no gradient on any rank keeps ``grad = None`` (the optimiser
    leaves it alone, as in one process).

    Args:
        params: the parameters, in the same order on every rank.
        has_grads: whether this rank accumulated gradients in the window.

    Returns:
        Whether any rank accumulated gradients (then the optimisers step on every rank).
    """
    params = list(params)
    if not _group_ready() or dist.get_world_size() == 1:
        return has_grads
    world = dist.get_world_size()
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    device = params[0].device if params else torch.device("cpu")
    flags = torch.tensor([p.grad is not None for p in params] + [bool(has_grads)], dtype=dtype, device=device)
    flat = [flags] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
    buf = torch.cat(flat)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    n = len(params)
    any_grad, any_window = buf[:n] > 0, bool(buf[n] > 0)
    offset = n + 1
    for i, p in enumerate(params):
        k = p.numel()
        if any_grad[i]:
            p.grad = (buf[offset:offset + k] / world).view_as(p).to(p.dtype).clone()
        else:
            p.grad = None
        offset += k
    return any_window


class DistributedE2ETrainer(SurrogateE2ETrainer):
    """:class:`~monai_wsi_ext.engines.e2e.SurrogateE2ETrainer` over ranks: each rank runs the surrogate step on its
    slides (its shard of the loader, e.g. a ``DistributedSampler``); at the end of each accumulation window the
    gradients of both networks are averaged over the ranks (:func:`average_gradients`) and every rank takes the
    same optimiser step, so the networks stay equal on all ranks. At the first iteration rank 0's weights are
    broadcast (:func:`broadcast_parameters`).

    With ``N`` ranks and ``accumulation_steps=k`` one optimiser step covers ``N x k`` slides and equals the step of
    one process with ``accumulation_steps=N x k`` over the same slides (tested in float64). Every rank must run the
    same number of iterations per epoch (``DistributedSampler`` pads the shards to equal length). Without a process
    group (or with one rank) it is the single-process trainer.

    Args:
        args, kwargs: those of :class:`~monai_wsi_ext.engines.e2e.SurrogateE2ETrainer`. ``amp=True`` is refused: a
            rank's mixed-precision overflow backs off only its own loss scale, and gradients of different scales
            cannot be averaged.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("amp"):
            raise ConfigError("`amp: true` is not supported by distributed end-to-end training "
                              "(multi_gpu_train_e2e.json): the ranks' loss scales would diverge; set amp to false.")
        super().__init__(*args, **kwargs)
        self._broadcast_done = False

    def _params(self) -> list[torch.nn.Parameter]:
        out = []
        for m in (self.encoder, self.unet):
            out += [p for p in m.parameters() if p.requires_grad]
        return out

    def _iteration(self, engine, batchdata):
        if not self._broadcast_done:
            broadcast_parameters([self.encoder, self.unet])
            self._broadcast_done = True
        return super()._iteration(engine, batchdata)

    def _end_window(self) -> None:
        self._window_has_grads = average_gradients(self._params(), self._window_has_grads)
        super()._end_window()
