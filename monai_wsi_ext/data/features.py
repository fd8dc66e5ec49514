"""Per-slide feature files (the canvas stage's input) and the canvas dataset over them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import Dataset

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import is_temporary_name
from monai_wsi_ext.model.canvas import label_canvas, layout_canvas, plan_canvases, sample_window
from monai_wsi_ext.model.networks import nolabel_target
from monai_wsi_ext.model.predict import append_prob_channel
from monai_wsi_ext.prep.grid import PatchLabel
from monai_wsi_ext.utils import split_set

__all__ = ["load_feature_file", "CanvasDataset", "canvas_class_weights", "budget_cells", "NOLABEL_TUMOR_FRACTION"]

NOLABEL_TUMOR_FRACTION = 0.5
"""With ``canvas_nolabel_weight``, a nolabel tissue cell is taken as tumor when its annotated tumor fraction (the
patch table's ``tumor`` column) is at least this, else as normal."""


def load_feature_file(path: str | os.PathLike) -> dict:
    """Read a feature file written by :class:`FeatureExtractor`."""
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    for k in ("split", "slide_id", "image", "cache_key"):
        if k in d:
            d[k] = str(d[k])
    d["grid_shape"] = tuple(int(v) for v in d["grid_shape"])
    d["cell_size"] = float(d["cell_size"])
    return d


class CanvasDataset(Dataset):
    """Feature canvases and label canvases of the slides in a feature folder.

    Training (``train=True``) yields ``canvas_size`` canvases: the centred canvas when the tissue fits, else a
    random window (anchored on a labelled patch), plus random rotations by 90° and flips of canvas and labels
    together. Evaluation yields each layout whole (larger than ``canvas_size`` when the tissue is), for a
    ``SlidingWindowInferer`` with ``roi_size=canvas_size``; use ``batch_size=1`` then.

    Items: ``image`` (C, H, W) float, ``label`` (H, W) long with ``IGNORE_INDEX`` for nolabel and background (with
    ``nolabel_targets``, the nolabel tissue cells of training items hold
    :func:`~monai_wsi_ext.model.networks.nolabel_target` codes instead).

    The canvas ablation options (``bundle/docs/configuration.md``, "Canvas ablation options"; all off by default,
    which is the paper's training):

    * ``feature_noise`` (training only): Gaussian noise of standard deviation ``feature_noise`` times the slide's
      per-channel feature standard deviation (over all its patches) is added to the features of the tissue cells
      of each training canvas (not to background, not to the probability channel).
    * ``feature_shift`` (training only): one random affine map per training canvas and feature channel, ``x' =
      exp(s z1) x + s z2 std`` with ``z1, z2 ~ N(0, 1)`` drawn per canvas and channel and ``std`` the slide's
      per-channel feature standard deviation, applied to the tissue cells (not to background, not to the
      probability channel): slides whose features are shifted as a whole (another stain, scanner or tissue
      source; feature-statistics augmentation as in domain generalisation), so that the U-Net learns from the
      cells' relations rather than from absolute feature values. Applied before the noise.
    * ``cell_dropout`` (training only): each tissue cell of a training canvas has its whole vector set to
      background (0) with this probability; its label is kept.
    * ``prob_channel``: the feature files' encoder head probabilities (``probs``) are appended as channel
      ``feature_dim`` (:func:`~monai_wsi_ext.model.predict.append_prob_channel`); C is then ``feature_dim + 1``.
    * ``nolabel_targets`` (training only; ``canvas_nolabel_weight`` set): nolabel tissue cells get the target
      :func:`~monai_wsi_ext.model.networks.nolabel_target` ``(c)`` with ``c`` tumor (1) when the tumor fraction of
      ``prepared_dir``'s patch table is at least :data:`NOLABEL_TUMOR_FRACTION`, else normal (0), for
      :class:`~monai_wsi_ext.model.networks.CanvasCrossEntropyLoss` with ``nolabel_weight``.

    Noise and dropout are drawn from the dataset's generator after the window and before the rotation/flip, and only
    when they are on, so the default items are unchanged. The rotation/flip is the dihedral group drawn uniformly (k
    in 0..3, then a flip of the last axis with probability 0.5): in distribution what MONAI's
    ``RandRotate90d(prob=0.75, max_k=3)`` + ``RandFlipd(prob=0.5, spatial_axis=1)`` draw, but kept on the dataset's
    single seeded generator (shared with the window draw and saved for resuming) so that runs stay reproducible
    and identical to earlier ones.

    The temporary files a killed feature extraction left in ``feature_dir`` (``.<slide_id>.npz.XXXXXXXX.npz``, see
    :func:`~monai_wsi_ext.io.atomic.is_temporary_name`) are not feature files and are ignored.

    Args:
        feature_dir: the feature folder (``extract_features.json``).
        split: split(s) to read (None: all).
        canvas_size: training canvas side.
        canvas_mode: ``slide`` or ``lumps``.
        train: training items (windows, augmentation) or whole layouts for evaluation.
        augment: random rotations/flips in training.
        multiple: rounding of layouts larger than ``canvas_size``.
        seed: seed of the dataset's generator.
        slide_ids: only these slides.
        feature_noise: ``canvas_feature_noise``, >= 0.
        feature_shift: ``canvas_feature_shift``, >= 0.
        cell_dropout: ``canvas_cell_dropout``, in [0, 1).
        prob_channel: ``canvas_prob_channel``.
        nolabel_targets: targets for nolabel tissue cells (``canvas_nolabel_weight`` is not null); needs
            ``prepared_dir``.
        prepared_dir: the prepared dataset (``dataset_dir``), read for the tumor fractions with ``nolabel_targets``.
        labelled_cells: a label budget for the U-Net (``canvas_label_fraction``, :func:`budget_cells`): slide id ->
            the ``(row, col)`` cells whose labels are used; every other labelled cell of those slides' feature files
            is treated as nolabel (no loss, not a window anchor, not counted by :meth:`class_counts`). None: every
            label.

    Raises:
        ConfigError: for an option out of range, or ``nolabel_targets`` without ``prepared_dir``.
        MonaiWsiExtError: no feature file for the split; with ``prob_channel`` a feature file without ``probs``;
            with ``nolabel_targets`` a slide whose patch table does not match its feature file.
    """

    def __init__(self, feature_dir: str, split: str | Sequence[str] | None = None, canvas_size: int = 512,
                 canvas_mode: str = "slide", train: bool = True, augment: bool = True, multiple: int = 16,
                 seed: int = 0, slide_ids: Sequence[str] | None = None, feature_noise: float = 0.0,
                 cell_dropout: float = 0.0, prob_channel: bool = False, nolabel_targets: bool = False,
                 prepared_dir: str | None = None, feature_shift: float = 0.0,
                 labelled_cells: Mapping[str, Iterable[tuple[int, int]]] | None = None):
        splits = split_set(split)
        self.canvas_size, self.train, self.augment = int(canvas_size), train, augment
        self.feature_noise, self.cell_dropout = float(feature_noise), float(cell_dropout)
        if not (np.isfinite(self.feature_noise) and self.feature_noise >= 0):
            raise ConfigError(f"`canvas_feature_noise` must be >= 0, got {feature_noise!r}.")
        self.feature_shift = float(feature_shift)
        if not (np.isfinite(self.feature_shift) and self.feature_shift >= 0):
            raise ConfigError(f"`canvas_feature_shift` must be >= 0, got {feature_shift!r}.")
        if not 0 <= self.cell_dropout < 1:
            raise ConfigError(f"`canvas_cell_dropout` must be in [0, 1), got {cell_dropout!r}.")
        nolabel_targets = bool(nolabel_targets) and train
        if nolabel_targets and not prepared_dir:
            raise ConfigError("`canvas_nolabel_weight` needs the prepared dataset (`prepared_dir`/`dataset_dir`) for "
                              "the tumor fractions of the nolabel cells.")
        self.generator = torch.Generator().manual_seed(int(seed))
        self.items = []
        for path in sorted(Path(feature_dir).glob("*.npz")):
            if is_temporary_name(path.name):
                continue
            d = load_feature_file(path)
            if (splits is not None and d["split"] not in splits) or (slide_ids is not None and
                                                                      d["slide_id"] not in slide_ids):
                continue
            if len(d["rows"]) == 0:
                continue
            feats = torch.from_numpy(d["features"]).float()
            labels = torch.from_numpy(d["labels"]).long()
            rows, cols = torch.from_numpy(d["rows"]).long(), torch.from_numpy(d["cols"]).long()
            if labelled_cells is not None:
                labels = _budget_labels(labels, rows, cols, labelled_cells.get(d["slide_id"], ()))
            slide = {"slide_id": d["slide_id"], "features": feats, "labels": labels, "n_features": feats.shape[1]}
            if self.feature_noise > 0 or self.feature_shift > 0:
                slide["feature_std"] = feats.std(dim=0, unbiased=False)
            if prob_channel:
                if d.get("probs") is None or np.asarray(d["probs"]).shape != (len(feats),):
                    raise MonaiWsiExtError(f"{path}: no encoder head probabilities (`probs`) for "
                                           "`canvas_prob_channel`; rerun extract_features with --overwrite true")
                slide["features"] = append_prob_channel(feats, torch.from_numpy(np.asarray(d["probs"])))
            if nolabel_targets:
                slide["nolabel_class"] = _nolabel_classes(path, d, Path(prepared_dir))
            for lay in plan_canvases(rows, cols, canvas_size, mode=canvas_mode, multiple=multiple):
                self.items.append({**slide, "layout": lay})
        if not self.items:
            raise MonaiWsiExtError(f"{feature_dir}: no feature files for split {split!r} (run extract_features)")

    def __len__(self) -> int:
        return len(self.items)

    def class_counts(self, num_classes: int = 2) -> torch.Tensor:
        """(num_classes,) numbers of labelled cells of each class over the slides' layouts (every patch lies in
        exactly one layout, so these are the label canvases' counts; nolabel and background are not counted)."""
        counts = torch.zeros(num_classes, dtype=torch.long)
        for item in self.items:
            lab = item["labels"][item["layout"].indices.long()]
            counts += torch.bincount(lab[(lab >= 0) & (lab < num_classes)], minlength=num_classes)
        return counts

    def _perturb(self, x: torch.Tensor, item: dict) -> torch.Tensor:
        """Feature shift, feature noise and cell dropout of the placed patches' vectors ``x`` (N, C) (training
        only)."""
        if self.feature_shift > 0:
            n, s = item["n_features"], self.feature_shift
            z = torch.randn((2, n), generator=self.generator, dtype=x.dtype)
            scale, shift = torch.exp(s * z[0]), s * z[1] * item["feature_std"]
            x = torch.cat([x[:, :n] * scale + shift, x[:, n:]], dim=1)
        if self.feature_noise > 0:
            n = item["n_features"]
            noise = torch.randn((x.shape[0], n), generator=self.generator, dtype=x.dtype)
            x = torch.cat([x[:, :n] + noise * (self.feature_noise * item["feature_std"]), x[:, n:]], dim=1)
        if self.cell_dropout > 0:
            drop = torch.rand(x.shape[0], generator=self.generator) < self.cell_dropout
            x = x.masked_fill(drop[:, None], 0.0)
        return x

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        lay = item["layout"]
        if self.train and tuple(lay.size) != (self.canvas_size, self.canvas_size):
            labelled = (item["labels"][lay.indices.long()] != PatchLabel.NOLABEL).float()
            lay = sample_window(lay, self.canvas_size, self.generator, weights=labelled if labelled.sum() else None)
        idx = lay.indices.long()
        x = item["features"][idx]
        if self.train:
            x = self._perturb(x, item)
        canvas = layout_canvas(x, lay)
        target = label_canvas(item["labels"][idx], lay.rows, lay.cols, lay.size, lay.offset)
        if "nolabel_class" in item:
            taken = label_canvas(item["nolabel_class"][idx], lay.rows, lay.cols, lay.size, lay.offset)
            target = torch.where(taken >= 0, nolabel_target(taken), target)
        if self.train and self.augment:
            k = int(torch.randint(0, 4, (1,), generator=self.generator))
            canvas, target = torch.rot90(canvas, k, (1, 2)), torch.rot90(target, k, (0, 1))
            if bool(torch.rand(1, generator=self.generator) < 0.5):
                canvas, target = torch.flip(canvas, (2,)), torch.flip(target, (1,))
        return {Keys.IMAGE: canvas.contiguous(), Keys.LABEL: target.contiguous(), "slide_id": item["slide_id"]}


def _budget_labels(labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   keep: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``labels`` with every labelled (tumor/normal) cell not in ``keep`` set to nolabel."""
    keep = {(int(r), int(c)) for r, c in keep}
    kept = torch.tensor([(int(r), int(c)) in keep for r, c in zip(rows.tolist(), cols.tolist())], dtype=torch.bool)
    out = labels.clone()
    out[(labels >= 0) & ~kept] = PatchLabel.NOLABEL
    return out


def budget_cells(items: Sequence[Mapping[str, Any]], fraction: float = 1.0, seed: int = 0
                 ) -> dict[str, set[tuple[int, int]]] | None:
    """The cells of a label budget for the canvas U-Net (``canvas_label_fraction``): the patches
    :func:`~monai_wsi_ext.data.patches.label_budget` keeps of ``items`` (a datalist split: ``slide_id``, ``row``,
    ``col``, ``label``), so that with the same fraction and seed the U-Net learns from the labels the encoder
    learned from (``train_encoder.json``'s ``label_fraction``).

    Returns:
        slide id -> set of ``(row, col)``; None for ``fraction`` 1 (every label).
    """
    from monai_wsi_ext.data.patches import label_budget

    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"`canvas_label_fraction` must be in (0, 1], got {fraction}.")
    if fraction == 1.0:
        return None
    out: dict[str, set[tuple[int, int]]] = {}
    for item in label_budget(items, fraction, seed):
        out.setdefault(str(item["slide_id"]), set()).add((int(item["row"]), int(item["col"])))
    return out


def _nolabel_classes(path: Path, d: dict, prepared_dir: Path) -> torch.Tensor:
    """(N,) the class each nolabel patch is taken as (1 tumor when its annotated tumor fraction, read from the
    prepared slide's patch table, is at least :data:`NOLABEL_TUMOR_FRACTION`, else 0 normal); -1 for the labelled
    patches."""
    from monai_wsi_ext.prep.prepare import load_prepared

    grid = load_prepared(prepared_dir / d["slide_id"]).grid
    if not (np.array_equal(grid.rows, d["rows"]) and np.array_equal(grid.cols, d["cols"]) and
            np.array_equal(grid.labels, d["labels"])):
        raise MonaiWsiExtError(f"{path}: the feature file does not match the patch table of "
                               f"{prepared_dir / d['slide_id']} (prepared again since extraction?); rerun "
                               "extract_features")
    labels = torch.from_numpy(np.asarray(d["labels"])).long()
    taken = torch.from_numpy(grid.tumor >= NOLABEL_TUMOR_FRACTION).long()
    return torch.where(labels == PatchLabel.NOLABEL, taken, torch.full_like(labels, -1))


def canvas_class_weights(spec, dataset: CanvasDataset | None = None, device=None) -> torch.Tensor | None:
    """The class weights of the canvas loss from the ``canvas_class_weights`` option.

    Args:
        spec: None (unweighted, the paper's), a ``[normal, tumor]`` list of weights, or ``"balanced"``:
            ``n / (2 * n_c)`` from the labelled cells' class counts ``n_c`` of the training label canvases
            (:meth:`CanvasDataset.class_counts`, ``n`` their sum), as scikit-learn's ``"balanced"``.
        dataset: the training canvas dataset (for ``"balanced"``).
        device: device of the returned tensor (the loss's).

    Returns:
        None, or a (2,) float32 tensor for ``CrossEntropyLoss(weight=...)``.

    Raises:
        ConfigError: for another string, a list that is not two finite weights >= 0 with a positive sum, or
            ``"balanced"`` without a dataset or with a class absent from it.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ConfigError(f"`canvas_class_weights` must be null, 'balanced' or [normal, tumor], got {spec!r}.")
        if dataset is None:
            raise ConfigError("`canvas_class_weights: balanced` needs the training canvas dataset.")
        counts = dataset.class_counts().double()
        if bool((counts == 0).any()):
            raise ConfigError(f"`canvas_class_weights: balanced` needs both classes in the training slides; labelled "
                              f"cells per class [normal, tumor]: {counts.long().tolist()}.")
        w = counts.sum() / (len(counts) * counts)
    else:
        try:
            w = torch.as_tensor([float(v) for v in spec], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"`canvas_class_weights` must be null, 'balanced' or [normal, tumor], got {spec!r}.") \
                from None
        if w.numel() != 2 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ConfigError(f"`canvas_class_weights` must be two finite weights >= 0 [normal, tumor] with a "
                              f"positive sum, got {spec!r}.")
    return w.float().to(device) if device is not None else w.float()
