"""The feature canvas: patch feature vectors laid out on the slide's patch grid.

A patch at grid cell ``(row, col)`` lands on canvas cell ``(row - r0, col - c0)`` where ``(r0, c0)`` is the canvas
offset (the grid cell that sits on canvas cell ``(0, 0)``; it may be negative when the tissue is centred on a larger
canvas). Cells without a patch are 0 in the feature canvas and :data:`IGNORE_INDEX` in the label canvas.

Everything here is pure torch and differentiable with respect to the features, so the end-to-end engine can read
``dL/dx`` for every patch straight from autograd. The canvas geometry is planned by :func:`plan_canvases`:

* ``mode="slide"``: one canvas per slide, the grid's bounding box centred in a ``canvas_size`` square. A grid larger
  than the canvas is never cut: the layout then covers the whole grid (``fits=False``); training samples
  ``canvas_size`` windows from it with :func:`sample_window` and inference runs the U-Net over all of it with a
  sliding window (:func:`canvas_forward`).
* ``mode="lumps"``: one centred canvas per tissue lump (8-connected component of occupied cells), the paper's
  biopsy setting (32 x 32).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from monai_wsi_ext.labels import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "as_index",
    "CanvasLayout",
    "inside_window",
    "scatter_to_canvas",
    "gather_from_canvas",
    "label_canvas",
    "layout_canvas",
    "layout_label_canvas",
    "plan_canvases",
    "sample_window",
    "canvas_forward",
]

logger = logging.getLogger(__name__)

# IGNORE_INDEX (imported above from monai_wsi_ext.labels, re-exported here): the label canvas value of background
# and ``nolabel`` cells; use it as the ``ignore_index`` of the cross-entropy loss.


def as_index(t, name: str, n: int | None = None) -> torch.Tensor:
    """``t`` as a flat LongTensor of grid coordinates/labels/ids (integers only; ``n`` entries when given)."""
    t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"`{name}` must hold integer grid coordinates/labels, got dtype {t.dtype}.")
    t = t.long().reshape(-1)
    if n is not None and t.numel() != n:
        raise ValueError(f"`{name}` must have one entry per patch ({n}), got {t.numel()}.")
    return t


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return int(v), int(v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"`{name}` must be an int or a pair (rows, cols), got {v!r}.")
    return v  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class CanvasLayout:
    """Where one canvas sits on the patch grid and which patches it holds.

    Attributes:
        offset: grid cell ``(r0, c0)`` placed at canvas cell ``(0, 0)`` (may be negative).
        size: canvas size ``(H, W)`` in cells.
        indices: LongTensor of the patch indices (into the slide's patch table) placed on this canvas.
        rows: grid rows of those patches (same length as ``indices``).
        cols: grid columns of those patches.
        fits: False when the tissue did not fit ``canvas_size`` and the layout covers the whole (larger) grid;
            train on :func:`sample_window` windows of it, infer with :func:`canvas_forward`.
    """

    offset: tuple[int, int]
    size: tuple[int, int]
    indices: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    fits: bool = True

    def __len__(self) -> int:
        return int(self.indices.numel())


def inside_window(rows, cols, size, offset=(0, 0)) -> torch.Tensor:
    """Boolean mask of the grid cells that fall inside a canvas window.

    Args:
        rows: grid rows, shape (N,).
        cols: grid columns, shape (N,).
        size: canvas size ``(H, W)`` (or an int for a square).
        offset: grid cell ``(r0, c0)`` at canvas cell ``(0, 0)``.

    Returns:
        BoolTensor (N,), True where ``0 <= row - r0 < H`` and ``0 <= col - c0 < W``.
    """
    rows, cols = as_index(rows, "rows"), as_index(cols, "cols")
    (h, w), (r0, c0) = _pair(size, "size"), _pair(offset, "offset")
    rr, cc = rows - r0, cols - c0
    return (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)


def scatter_to_canvas(features: torch.Tensor, rows, cols, size, offset=(0, 0)) -> torch.Tensor:
    """Lay per-patch feature vectors onto a zero canvas (differentiable with respect to ``features``).

    Args:
        features: (N, C) feature vectors.
        rows: grid rows, shape (N,).
        cols: grid columns, shape (N,).
        size: canvas size ``(H, W)`` (or an int for a square).
        offset: grid cell ``(r0, c0)`` at canvas cell ``(0, 0)``; cells outside the window are dropped.

    Returns:
        (C, H, W) canvas on the device and dtype of ``features``; empty cells are 0. Patch grids have one patch per
        cell; should two patches share a cell their features are summed (deterministically).

    Raises:
        ValueError: when the shapes of ``features``, ``rows`` and ``cols`` do not agree.
    """
    if features.ndim != 2:
        raise ValueError(f"`features` must have shape (N, C), got {tuple(features.shape)}.")
    rows, cols = as_index(rows, "rows"), as_index(cols, "cols")
    if rows.numel() != features.shape[0] or cols.numel() != features.shape[0]:
        raise ValueError(
            f"`rows` ({rows.numel()}) and `cols` ({cols.numel()}) must have one entry per feature row "
            f"({features.shape[0]})."
        )
    (h, w), (r0, c0) = _pair(size, "size"), _pair(offset, "offset")
    keep = inside_window(rows, cols, (h, w), (r0, c0)).to(features.device)
    flat = ((rows.to(features.device) - r0) * w + (cols.to(features.device) - c0))[keep]
    canvas = features.new_zeros((h * w, features.shape[1]))
    canvas = canvas.index_put((flat,), features[keep], accumulate=True)
    return canvas.t().reshape(features.shape[1], h, w).contiguous()


def gather_from_canvas(canvas: torch.Tensor, rows, cols, offset=(0, 0)) -> torch.Tensor:
    """Read the canvas vectors at the given grid cells (the inverse of :func:`scatter_to_canvas`).

    Args:
        canvas: (C, H, W) or (B, C, H, W).
        rows: grid rows, shape (N,).
        cols: grid columns, shape (N,).
        offset: grid cell ``(r0, c0)`` at canvas cell ``(0, 0)``.

    Returns:
        (N, C) for a 3-d canvas, (B, N, C) for a 4-d canvas.

    Raises:
        ValueError: when a cell lies outside the canvas; select cells with :func:`inside_window` first.
    """
    if canvas.ndim not in (3, 4):
        raise ValueError(f"`canvas` must be (C, H, W) or (B, C, H, W), got shape {tuple(canvas.shape)}.")
    h, w = canvas.shape[-2:]
    rows, cols = as_index(rows, "rows"), as_index(cols, "cols")
    inside = inside_window(rows, cols, (h, w), offset)
    if not bool(inside.all()):
        raise ValueError(
            f"{int((~inside).sum())} of {inside.numel()} cells lie outside the {h}x{w} canvas at offset {offset}; "
            "select them with `inside_window(rows, cols, size, offset)` before gathering."
        )
    r0, c0 = _pair(offset, "offset")
    flat = ((rows - r0) * w + (cols - c0)).to(canvas.device)
    values = canvas.flatten(-2).index_select(-1, flat)  # (..., C, N)
    return values.transpose(-1, -2)


def label_canvas(labels, rows, cols, size, offset=(0, 0)) -> torch.Tensor:
    """Per-cell class targets for the canvas loss.

    Args:
        labels: (N,) patch labels: 1 tumor, 0 normal, any negative value (-1) nolabel.
        rows: grid rows, shape (N,).
        cols: grid columns, shape (N,).
        size: canvas size ``(H, W)`` (or an int for a square).
        offset: grid cell ``(r0, c0)`` at canvas cell ``(0, 0)``; cells outside the window are dropped.

    Returns:
        LongTensor (H, W) on the labels' device: the label of each placed patch, :data:`IGNORE_INDEX` for
        nolabel patches and for background.
    """
    labels = as_index(labels, "labels")
    rows, cols = as_index(rows, "rows"), as_index(cols, "cols")
    if not (labels.numel() == rows.numel() == cols.numel()):
        raise ValueError(
            f"`labels` ({labels.numel()}), `rows` ({rows.numel()}) and `cols` ({cols.numel()}) must have equal length."
        )
    (h, w), (r0, c0) = _pair(size, "size"), _pair(offset, "offset")
    rows, cols = rows.to(labels.device), cols.to(labels.device)
    keep = inside_window(rows, cols, (h, w), (r0, c0))
    out = torch.full((h * w,), IGNORE_INDEX, dtype=torch.long, device=labels.device)
    lab = labels[keep].clone()
    lab[lab < 0] = IGNORE_INDEX
    out[((rows - r0) * w + (cols - c0))[keep]] = lab
    return out.reshape(h, w)


def layout_canvas(features: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """:func:`scatter_to_canvas` for a layout: ``features`` are the (len(layout), C) vectors of ``layout.indices``."""
    return scatter_to_canvas(features, layout.rows, layout.cols, layout.size, layout.offset)


def layout_label_canvas(labels, layout: CanvasLayout) -> torch.Tensor:
    """:func:`label_canvas` for a layout; ``labels`` is the slide's full (N,) label vector."""
    labels = as_index(labels, "labels")
    return label_canvas(labels[layout.indices.to(labels.device)], layout.rows, layout.cols, layout.size, layout.offset)


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _centred_layout(indices, rows, cols, canvas_size: int, multiple: int) -> CanvasLayout:
    rmin, rmax = int(rows.min()), int(rows.max())
    cmin, cmax = int(cols.min()), int(cols.max())
    bh, bw = rmax - rmin + 1, cmax - cmin + 1
    fits = bh <= canvas_size and bw <= canvas_size
    if fits:
        h = w = canvas_size
    else:
        h = max(canvas_size, _round_up(bh, multiple))
        w = max(canvas_size, _round_up(bw, multiple))
    offset = (rmin - (h - bh) // 2, cmin - (w - bw) // 2)
    return CanvasLayout(offset=offset, size=(h, w), indices=indices, rows=rows, cols=cols, fits=fits)


def _components(rows: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
    from scipy import ndimage  # scipy comes with scikit-image

    r = rows.numpy() - int(rows.min())
    c = cols.numpy() - int(cols.min())
    occ = np.zeros((int(r.max()) + 1, int(c.max()) + 1), dtype=bool)
    occ[r, c] = True
    lab, _ = ndimage.label(occ, structure=np.ones((3, 3), dtype=bool))
    return lab[r, c]


def plan_canvases(
    rows,
    cols,
    canvas_size: int,
    mode: str = "slide",
    tissue_components=None,
    multiple: int = 16,
) -> list[CanvasLayout]:
    """Plan the canvases of one slide.

    Args:
        rows: grid rows of the slide's patches, shape (N,).
        cols: grid columns, shape (N,).
        canvas_size: side of the square canvas the U-Net is trained on (512 per Camelyon slide, 32 per lump).
        mode: ``"slide"`` (one canvas centred on the grid's bounding box) or ``"lumps"`` (one centred canvas per
            8-connected component of occupied cells).
        tissue_components: optional (N,) integer lump id per patch (e.g. from labelling the tissue mask); replaces
            the connected components of the occupied cells in ``"lumps"`` mode.
        multiple: a layout that does not fit ``canvas_size`` is enlarged to cover the whole grid, rounded up to a
            multiple of this (use ``2**depth`` of the U-Net).

    Returns:
        Layouts in patch-table order of their first patch (``"lumps"``) or a single layout (``"slide"``); every patch
        appears in exactly one layout. ``fits`` is False for layouts larger than ``canvas_size``.

    Raises:
        ValueError: for an unknown mode, a non-positive size or mismatched inputs.
    """
    rows, cols = as_index(rows, "rows"), as_index(cols, "cols")
    if rows.numel() != cols.numel():
        raise ValueError(f"`rows` ({rows.numel()}) and `cols` ({cols.numel()}) must have equal length.")
    if int(canvas_size) < 1 or int(multiple) < 1:
        raise ValueError(f"`canvas_size` and `multiple` must be positive, got {canvas_size} and {multiple}.")
    canvas_size, multiple = int(canvas_size), int(multiple)
    if rows.numel() == 0:
        return []
    rows, cols = rows.cpu(), cols.cpu()
    if mode == "slide":
        layouts = [_centred_layout(torch.arange(rows.numel()), rows, cols, canvas_size, multiple)]
    elif mode == "lumps":
        if tissue_components is not None:
            comp = as_index(tissue_components, "tissue_components").cpu().numpy()
            if comp.size != rows.numel():
                raise ValueError(
                    f"`tissue_components` must have one lump id per patch ({rows.numel()}), got {comp.size}."
                )
        else:
            comp = _components(rows, cols)
        _, first = np.unique(comp, return_index=True)
        layouts = []
        for lump in comp[np.sort(first)]:
            idx = torch.from_numpy(np.flatnonzero(comp == lump))
            layouts.append(_centred_layout(idx, rows[idx], cols[idx], canvas_size, multiple))
    else:
        raise ValueError(f"`mode` must be 'slide' or 'lumps', got {mode!r}.")
    for lay in layouts:
        if not lay.fits:
            logger.info(
                "tissue of %d patches spans more than %dx%d cells; canvas enlarged to %dx%d (windows in training, "
                "sliding window at inference)",
                len(lay),
                canvas_size,
                canvas_size,
                *lay.size,
            )
    return layouts


def sample_window(
    layout: CanvasLayout,
    canvas_size: int,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> CanvasLayout:
    """Draw one ``canvas_size`` x ``canvas_size`` training window from a layout.

    A layout of exactly that size is returned unchanged. Otherwise an anchor patch is drawn (uniformly, or in
    proportion to ``weights``, e.g. 1 for labelled patches and 0 for nolabel) and the window origin is drawn uniformly
    among the positions that contain the anchor and stay inside the layout (a dimension smaller than the window is
    centred). Patches outside the window are left out of the returned sub-layout.

    Args:
        layout: the layout to sample from.
        canvas_size: window side in cells.
        generator: random generator (for reproducible windows).
        weights: optional (len(layout),) non-negative anchor weights; all zero falls back to uniform.

    Returns:
        A layout of size ``(canvas_size, canvas_size)`` with ``fits=True``.
    """
    s = int(canvas_size)
    if tuple(layout.size) == (s, s):
        return layout
    n = len(layout)
    if n == 0:
        return replace(layout, size=(s, s), fits=True)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu().clamp_min(0)
        if w.numel() != n:
            raise ValueError(f"`weights` must have one entry per layout patch ({n}), got {w.numel()}.")
        if float(w.sum()) <= 0:
            w = None
    else:
        w = None
    if w is None:
        anchor = int(torch.randint(n, (1,), generator=generator))
    else:
        anchor = int(torch.multinomial(w, 1, generator=generator))
    origin = []
    for axis, coord in enumerate((int(layout.rows[anchor]), int(layout.cols[anchor]))):
        lo_layout, length = layout.offset[axis], layout.size[axis]
        if length <= s:
            origin.append(lo_layout - (s - length) // 2)
            continue
        lo = max(lo_layout, coord - s + 1)
        hi = min(lo_layout + length - s, coord)
        origin.append(lo + int(torch.randint(hi - lo + 1, (1,), generator=generator)))
    keep = inside_window(layout.rows, layout.cols, (s, s), origin)
    return CanvasLayout(
        offset=(origin[0], origin[1]),
        size=(s, s),
        indices=layout.indices[keep],
        rows=layout.rows[keep],
        cols=layout.cols[keep],
        fits=True,
    )


def canvas_forward(
    unet: nn.Module,
    canvas: torch.Tensor,
    canvas_size: int | Sequence[int],
    inferer=None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Run the U-Net on a canvas of any size.

    Args:
        unet: the canvas segmentation network.
        canvas: (C, H, W) or (B, C, H, W) feature canvas.
        canvas_size: the size the U-Net was trained on; a canvas of exactly this size goes straight through.
        inferer: optional MONAI inferer for other sizes; defaults to ``SlidingWindowInferer(roi_size=canvas_size,
            overlap=overlap, mode="gaussian")``.
        overlap: sliding-window overlap when ``inferer`` is None.

    Returns:
        Logits with the batch/channel layout of the U-Net and the spatial size of ``canvas`` (a 3-d input gives a
        3-d output).
    """
    squeeze = canvas.ndim == 3
    x = canvas.unsqueeze(0) if squeeze else canvas
    if x.ndim != 4:
        raise ValueError(f"`canvas` must be (C, H, W) or (B, C, H, W), got shape {tuple(canvas.shape)}.")
    roi = _pair(canvas_size, "canvas_size")
    if tuple(x.shape[-2:]) == roi:
        out = unet(x)
    else:
        if inferer is None:
            from monai.inferers import SlidingWindowInferer

            inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=overlap, mode="gaussian")
        out = inferer(x, unet)
    return out[0] if squeeze else out
