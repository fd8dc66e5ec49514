"""The label codes, in one place: patch labels, grid-cell labels, canvas targets and annotation-mask values.

Every module that writes or reads one of these codes imports it from here; the names stay importable from where
they were first defined (:class:`~monai_wsi_ext.prep.grid.PatchLabel`, ``evaluation.metrics.LABEL_*``,
``model.canvas.IGNORE_INDEX``, ``io.annotations.MASK_*``), as aliases of these objects.

Four code spaces, each an integer per element:

* **Patch labels** (:class:`PatchLabel`; ``patches.csv``'s ``label`` column, ``datalist.json``, ``PatchGrid.labels``,
  the encoder's targets): :data:`LABEL_TUMOR` ``= 1``, :data:`LABEL_NORMAL` ``= 0``, :data:`LABEL_NOLABEL` ``= -1``
  (an ambiguous patch: neither the tumor nor the normal threshold reached; kept for inference, left out of training
  targets and of every patch metric).
* **Grid labels** (``PatchGrid.label_grid()``, ``<slide_id>_labels.npy``, the evaluation's ``(H, W)`` arrays): the
  patch labels of the kept cells, :data:`LABEL_BACKGROUND` ``= -2`` everywhere else (no tissue: not a patch).
* **Canvas targets** (the label canvas of the U-Net loss): the patch label of each placed tumor or normal patch and
  :data:`IGNORE_INDEX` ``= -1`` for nolabel patches and empty cells alike; it is the ``ignore_index`` of the
  cross-entropy loss (``canvas_loss``, ``train_canvas.json``, ``train_e2e.json``).
* **Annotation masks** (rasterised annotations, label-mask images read by ``io.annotations``):
  :data:`MASK_UNANNOTATED` ``= 0``, :data:`MASK_NORMAL` ``= 1``, :data:`MASK_TUMOR` ``= 2``. These are pixel values
  of a mask, not patch labels; :func:`~monai_wsi_ext.prep.grid.label_cells` turns them into patch labels.

The codes that count as labelled (tumor, normal) are exactly the non-negative ones and the two "not a target" codes
(nolabel, background) are negative, so ``labels >= 0`` / ``labels < 0`` are the package's tests for "is a tumor or
normal patch" and "is excluded"; keep that property when adding a code. The values are part of the on-disk formats
(``patches.csv``, ``*_labels.npy``) and of trained checkpoints' class order: do not change them.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "PatchLabel",
    "LABEL_TUMOR",
    "LABEL_NORMAL",
    "LABEL_NOLABEL",
    "LABEL_BACKGROUND",
    "GRID_LABELS",
    "IGNORE_INDEX",
    "MASK_UNANNOTATED",
    "MASK_NORMAL",
    "MASK_TUMOR",
]


class PatchLabel(IntEnum):
    """Per-patch label codes used in patch tables, label canvases and metrics."""

    NOLABEL = -1
    NORMAL = 0
    TUMOR = 1


LABEL_TUMOR: int = int(PatchLabel.TUMOR)
"""A tumor patch (the positive class; channel 1 of the two-class networks)."""
LABEL_NORMAL: int = int(PatchLabel.NORMAL)
"""A normal patch (channel 0 of the two-class networks)."""
LABEL_NOLABEL: int = int(PatchLabel.NOLABEL)
"""An ambiguous patch: excluded from training targets and from every patch metric."""
LABEL_BACKGROUND: int = -2
"""A grid cell without (enough) tissue: not a patch; only in grid labels, never in a patch table."""
GRID_LABELS: tuple[int, ...] = (LABEL_TUMOR, LABEL_NORMAL, LABEL_NOLABEL, LABEL_BACKGROUND)
"""Every value a grid label may hold (tumor, normal, nolabel, background)."""

IGNORE_INDEX: int = -1
"""Label-canvas value of nolabel patches and empty (background) cells; the ``ignore_index`` of the canvas loss."""

MASK_UNANNOTATED: int = 0
"""Annotation-mask value of pixels no annotation covers."""
MASK_NORMAL: int = 1
"""Annotation-mask value of pixels annotated normal."""
MASK_TUMOR: int = 2
"""Annotation-mask value of pixels annotated tumor (tumor wins where annotations overlap)."""
