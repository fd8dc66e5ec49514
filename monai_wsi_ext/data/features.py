"""Per-slide feature files (the canvas stage's input) and the canvas dataset over them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import Dataset

from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.io.atomic import is_temporary_name
from monai_wsi_ext.model.canvas import label_canvas, layout_canvas, plan_canvases, sample_window
from monai_wsi_ext.prep.grid import PatchLabel
from monai_wsi_ext.utils import split_set

__all__ = ["load_feature_file", "CanvasDataset"]


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

    Items: ``image`` (C, H, W) float, ``label`` (H, W) long with ``IGNORE_INDEX`` for nolabel and background.

    The temporary files a killed feature extraction left in ``feature_dir`` (``.<slide_id>.npz.XXXXXXXX.npz``, see
    :func:`~monai_wsi_ext.io.atomic.is_temporary_name`) are not feature files and are ignored.
    """

    def __init__(self, feature_dir: str, split: str | Sequence[str] | None = None, canvas_size: int = 512,
                 canvas_mode: str = "slide", train: bool = True, augment: bool = True, multiple: int = 16,
                 seed: int = 0, slide_ids: Sequence[str] | None = None):
        splits = split_set(split)
        self.canvas_size, self.train, self.augment = int(canvas_size), train, augment
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
            for lay in plan_canvases(rows, cols, canvas_size, mode=canvas_mode, multiple=multiple):
                self.items.append({"slide_id": d["slide_id"], "features": feats, "labels": labels, "layout": lay})
        if not self.items:
            raise MonaiWsiExtError(f"{feature_dir}: no feature files for split {split!r} (run extract_features)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        lay = item["layout"]
        if self.train and tuple(lay.size) != (self.canvas_size, self.canvas_size):
            labelled = (item["labels"][lay.indices.long()] != PatchLabel.NOLABEL).float()
            lay = sample_window(lay, self.canvas_size, self.generator, weights=labelled if labelled.sum() else None)
        idx = lay.indices.long()
        canvas = layout_canvas(item["features"][idx], lay)
        target = label_canvas(item["labels"][idx], lay.rows, lay.cols, lay.size, lay.offset)
        if self.train and self.augment:
            k = int(torch.randint(0, 4, (1,), generator=self.generator))
            canvas, target = torch.rot90(canvas, k, (1, 2)), torch.rot90(target, k, (0, 1))
            if bool(torch.rand(1, generator=self.generator) < 0.5):
                canvas, target = torch.flip(canvas, (2,)), torch.flip(target, (1,))
        return {Keys.IMAGE: canvas.contiguous(), Keys.LABEL: target.contiguous(), "slide_id": item["slide_id"]}
