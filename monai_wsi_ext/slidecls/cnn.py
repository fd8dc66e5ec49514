"""Slide-level classification by a CNN on the whole slide at a fixed input size (the review's first workflow).

Each slide becomes one ``thumb_size`` x ``thumb_size`` image at ``thumb_mpp`` µm/px, padded, never stretched
(:func:`~monai_wsi_ext.slidecls.thumbnails.slide_thumbnail`), labelled with its class (tumor / no tumor, or the
Camelyon17 classes; :func:`~monai_wsi_ext.slidecls.thumbnails.slide_target`). The network is any backbone of
:func:`~monai_wsi_ext.model.backbones.build_backbone` (torchvision by name, ``monai:<name>``, ``small_cnn``; random
weights, local pretrained weights optional) with a linear head (:class:`SlideCNN`).

* :class:`SlideThumbnailDataset`: the thumbnails of a prepared split, read once and kept (a few hundred kB per
  slide), augmented in training by :class:`~monai_wsi_ext.tileseg.tiles.TileAugmentd` (the 8 symmetries of the
  square and the colour part of the paper's augmentation).
* :class:`SlideAUC`: the validation's key metric (ROC-AUC of P(tumor) over the validation slides).
* :class:`SlideCNNInferer` and :class:`SlideScoreWriter`: inference as the other slide runs do it, one slide per
  iteration of the :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator`, into ``slide_scores.json``
  (:mod:`~monai_wsi_ext.slidecls.scores`).
* :class:`SlideCNNClassifier`: the trained network as a plain callable on prepared slides (the hierarchical gate).

Bundle configs: ``train_slide_cnn.json``, ``infer_slide_cnn.json``; documentation: ``bundle/docs/slide_level.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.transforms import Randomizable
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.utils.data import Dataset

from monai_wsi_ext.engines.handlers import attach_once, init_state_records, slide_batch_item
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.model.backbones import build_backbone
from monai_wsi_ext.model.predict import eval_mode
from monai_wsi_ext.prep.prepare import PreparedSlide, load_prepared_slides
from monai_wsi_ext.slidecls.scores import write_slide_scores
from monai_wsi_ext.slidecls.thumbnails import SLIDE_CLASSES, slide_target, slide_thumbnail, tumor_score
from monai_wsi_ext.tileseg.tiles import TileAugmentd, tile_tensors
from monai_wsi_ext.utils import module_device

__all__ = ["SlideCNN", "SlideThumbnailDataset", "SlideAUC", "SlideLogLikelihood", "SlideCNNInferer", "SlideScoreWriter",
           "SlideCNNClassifier", "load_state"]

logger = logging.getLogger(__name__)


class SlideCNN(nn.Module):
    """A classification backbone (pooled features) and a linear head: ``(B, 3, S, S)`` in [0, 1] -> logits.

    Args:
        backbone: a :func:`~monai_wsi_ext.model.backbones.build_backbone` name.
        num_classes: 2 (tumor / no tumor) or 4 (Camelyon17 classes).
        dropout: dropout before the head.
        pretrained_path: local weights of the backbone (a state dict; nothing is downloaded).
    """

    def __init__(self, backbone: str = "small_cnn", num_classes: int = 2, dropout: float = 0.0,
                 pretrained_path: str | None = None):
        super().__init__()
        if int(num_classes) < 2:
            raise ConfigError(f"`num_classes` must be at least 2, got {num_classes!r}.")
        self.backbone = build_backbone(backbone, dropout=0.0)
        if pretrained_path:
            state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
            logger.info("slide CNN backbone weights from %s (%d missing, %d unexpected keys)", pretrained_path,
                        len(missing), len(unexpected))
        self.drop = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        self.head = nn.Linear(int(self.backbone.out_features), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.backbone(x)))


class SlideThumbnailDataset(Dataset, Randomizable):
    """Thumbnails and classes of the prepared slides of a split (the slide CNN's training and validation data).

    Items: ``image`` float ``(3, S, S)`` in [0, 1], ``label`` int64 scalar (class index), ``slide_id``. Slides
    that cannot be read are left out with a warning (named); a split without slides is an error.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        split: split(s) to use.
        thumb_mpp: thumbnail resolution, µm/px.
        thumb_size: side of the square input.
        classes: ``binary`` or ``camelyon17``.
        train: augment (rotations, flips, colour).
        factor_range: colour augmentation range (None: none).
        oversize: see :func:`~monai_wsi_ext.slidecls.thumbnails.slide_thumbnail`.
        class_map: class-name mapping of polygon annotations.
        backend: slide reader backend.
        seed: seed of the augmentation.

    Raises:
        MonaiWsiExtError: no readable slide in the split.
    """

    def __init__(self, prepared_dir: str, split: str | Sequence[str] | None = "training", thumb_mpp: float = 8.0,
                 thumb_size: int = 256, classes: str = "binary", train: bool = True,
                 factor_range: Sequence[float] | None = (0.75, 1.25), oversize: str = "fit",
                 class_map: Mapping[str, str] | None = None, backend: str = "auto", seed: int = 0):
        if classes not in SLIDE_CLASSES:
            raise ConfigError(f"`slide_classes` must be one of {sorted(SLIDE_CLASSES)}, got {classes!r}.")
        self.classes, self.train = classes, bool(train)
        self.augment = TileAugmentd(factor_range=factor_range) if train else None
        self.set_random_state(seed)
        self.images: list[np.ndarray] = []
        self.targets: list[int] = []
        self.slide_ids: list[str] = []
        for prepared in load_prepared_slides(prepared_dir, split):
            try:
                img, _ = slide_thumbnail(prepared.open(backend), thumb_mpp, thumb_size, oversize)
                target = slide_target(prepared, classes, class_map)
            except (MonaiWsiExtError, OSError, ValueError) as e:
                logger.warning("%s: left out of the slide CNN data (%s: %s)", prepared.slide_id, type(e).__name__, e)
                continue
            finally:
                prepared.close()
            self.images.append(img)
            self.targets.append(int(target))
            self.slide_ids.append(prepared.slide_id)
        if not self.images:
            raise MonaiWsiExtError(f"{prepared_dir}: no readable prepared slide for split {split!r} (run "
                                   "scripts/prepare_dataset.py first).")
        logger.info("slide CNN data (%s): %d slide(s), classes %s", split, len(self.images),
                    np.bincount(self.targets, minlength=len(SLIDE_CLASSES[classes])).tolist())

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if getattr(self, "augment", None) is not None:
            self.augment.set_random_state(int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data=None) -> None:  # the draws happen in the augmentation
        pass

    @property
    def labels(self) -> np.ndarray:
        """Per slide: 1 with tumor, 0 without (for the balanced sampler; any non-negative class counts as tumor)."""
        return (np.asarray(self.targets) > 0).astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        img = self.images[index]
        dummy = np.zeros(img.shape[:2], np.int64)
        item = self.augment({"image": img, "label": dummy}) if self.augment is not None else tile_tensors(img, dummy)
        return {"image": item["image"], "label": torch.tensor(self.targets[index], dtype=torch.int64),
                "slide_id": self.slide_ids[index]}


class SlideAUC(Metric):
    """ROC-AUC of P(tumor) over every slide the metric sees (binary: softmax channel 1; more classes: one minus the
    channel of class 0, negative). ``output``: ``(logits (B, K), labels (B,))``; 0.5 with one class only (an
    undefined AUC must not make a checkpoint "best")."""

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []

    @reinit__is_reduced
    def update(self, output) -> None:
        logits, y = output[0].detach().float(), output[1].detach()
        p = torch.softmax(logits, dim=1)
        s = p[:, 1] if p.shape[1] == 2 else 1.0 - p[:, 0]
        self._scores += s.cpu().tolist()
        self._labels += (y.view(-1).cpu() > 0).long().tolist()

    def compute(self) -> float:
        from sklearn.metrics import roc_auc_score

        if len(set(self._labels)) < 2:
            return 0.5
        return float(roc_auc_score(self._labels, self._scores))


class SlideLogLikelihood(Metric):
    """Mean log-probability of the true class over every slide the metric sees (0 is perfect, higher is better):
    the validation's key metric, because with a handful of validation slides the AUC ties at 1.0 early and would
    keep the first epoch's model. ``output``: ``(logits (B, K), labels (B,))``."""

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum, self._n = 0.0, 0

    @reinit__is_reduced
    def update(self, output) -> None:
        logits, y = output[0].detach().float(), output[1].detach().view(-1).long()
        logp = torch.log_softmax(logits, dim=1).gather(1, y.to(logits.device)[:, None])[:, 0]
        self._sum += float(logp.sum())
        self._n += int(y.numel())

    def compute(self) -> float:
        return self._sum / self._n if self._n else float("-inf")


def load_state(path: str) -> dict:
    """A slide CNN state dict from a checkpoint file (a bare state dict or a CheckpointSaver dict with
    ``network``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
        state = state["network"]
    return state


class SlideCNNInferer:
    """The slide CNN on one slide, for the slide evaluator (``infer_slide_cnn.json``).

    ``inferer(item, network)`` reads the item's prepared slide as a thumbnail and returns ``{"probs": class
    probabilities, "score": P(tumor), "pred": class index, "thumb": thumbnail info, "seconds"}``.

    Args:
        thumb_mpp: thumbnail resolution, as in training.
        thumb_size: input side, as in training.
        classes: ``binary`` or ``camelyon17``, as in training.
        oversize: see :func:`~monai_wsi_ext.slidecls.thumbnails.slide_thumbnail`.
        backend: slide reader backend.
    """

    def __init__(self, thumb_mpp: float = 8.0, thumb_size: int = 256, classes: str = "binary", oversize: str = "fit",
                 backend: str = "auto"):
        if classes not in SLIDE_CLASSES:
            raise ConfigError(f"`slide_classes` must be one of {sorted(SLIDE_CLASSES)}, got {classes!r}.")
        self.thumb_mpp, self.thumb_size, self.classes = float(thumb_mpp), int(thumb_size), classes
        self.oversize, self.backend = oversize, backend

    def predict(self, prepared: PreparedSlide, network: nn.Module) -> dict[str, Any]:
        """Class probabilities of one prepared slide."""
        t0 = time.perf_counter()
        img, info = slide_thumbnail(prepared.open(self.backend), self.thumb_mpp, self.thumb_size, self.oversize)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)[None]
        device = module_device(network)[0]
        with eval_mode(network), torch.inference_mode():
            probs = torch.softmax(network(x.to(device)).float(), dim=1)[0].cpu().numpy()
        return {"probs": [float(v) for v in probs], "score": tumor_score(probs, self.classes),
                "pred": int(np.argmax(probs)), "thumb": info, "seconds": round(time.perf_counter() - t0, 3)}

    def __call__(self, inputs: dict, network: nn.Module | None = None) -> dict[str, Any]:
        if network is None:
            raise ValueError("the slide CNN inferer needs the network as `network`.")
        return self.predict(inputs["prepared"], network)


class SlideScoreWriter:
    """Collects the slide CNN's predictions and writes ``slide_scores.json`` when the run completes
    (:func:`~monai_wsi_ext.slidecls.scores.write_slide_scores`); ``engine.state.results`` gets each slide (for the
    :class:`~monai_wsi_ext.outputs.handlers.InferenceSummary`).

    Args:
        output_path: the scores file.
        method: the method's name in the file (and in the evaluation).
        threshold: decision threshold on P(tumor).
        classes: ``binary`` or ``camelyon17``.
        extra: further top-level keys of the file (settings, weights).
    """

    def __init__(self, output_path: str, method: str = "slide_cnn", threshold: float = 0.5, classes: str = "binary",
                 extra: Mapping[str, Any] | None = None):
        self.output_path, self.method, self.threshold = Path(output_path), str(method), float(threshold)
        self.classes, self.extra = classes, dict(extra or {})
        self._attached: set[int] = set()

    def attach(self, engine: Engine) -> None:
        attach_once(engine, self._attached, [(Events.STARTED, self._started), (Events.ITERATION_COMPLETED, self),
                                             (Events.COMPLETED, self.write)])

    def _started(self, engine: Engine) -> None:
        init_state_records(engine)
        self._slides: dict[str, dict] = {}

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out is None or out.get(Keys.PRED) is None:
            return
        item = slide_batch_item(engine)
        pred, sid = out[Keys.PRED], item["slide_id"]
        call = int(pred["score"] > self.threshold) if self.classes == "binary" else int(pred["pred"])
        self._slides[sid] = {"score": pred["score"], "pred": call, "probs": pred["probs"], "thumb": pred["thumb"],
                             "seconds": pred["seconds"]}
        engine.state.results[sid] = {"slide_score": pred["score"], "pred": call, "seconds": pred["seconds"]}
        logger.info("%s: P(tumor) %.3f (%s)", sid, pred["score"], SLIDE_CLASSES[self.classes][int(pred["pred"])])

    def write(self, engine: Engine) -> None:
        if self._slides:
            write_slide_scores(self.output_path, self.method, self._slides, self.threshold,
                               SLIDE_CLASSES[self.classes], **self.extra)
            logger.info("slide CNN: %d slide(s) -> %s", len(self._slides), self.output_path)


class SlideCNNClassifier:
    """A trained slide CNN as a callable on prepared slides: ``classifier(prepared) -> P(tumor)`` (the gate of the
    hierarchical pipeline; :meth:`predict` gives everything :class:`SlideCNNInferer` gives).

    Args:
        checkpoint: weights of the :class:`SlideCNN` (``train_slide_cnn.json``'s ``slide_cnn.pt``).
        backbone, num_classes: as in training.
        thumb_mpp, thumb_size, classes, oversize, backend: see :class:`SlideCNNInferer`.
        device: where the network runs.

    Raises:
        ConfigError: the checkpoint is missing or does not fit the network.
    """

    def __init__(self, checkpoint: str, backbone: str = "small_cnn", thumb_mpp: float = 8.0, thumb_size: int = 256,
                 classes: str = "binary", oversize: str = "fit", backend: str = "auto",
                 device: str | torch.device = "cpu"):
        if not Path(checkpoint).is_file():
            raise ConfigError(f"slide CNN checkpoint {checkpoint!r} not found (train it with train_slide_cnn.json).")
        self.network = SlideCNN(backbone, len(SLIDE_CLASSES.get(classes, ())) or 2)
        try:
            self.network.load_state_dict(load_state(checkpoint))
        except RuntimeError as e:
            raise ConfigError(f"{checkpoint}: does not fit a slide CNN of backbone {backbone!r} and classes "
                              f"{classes!r} ({e}).") from e
        self.network.to(device).eval()
        self.checkpoint = str(checkpoint)
        self.inferer = SlideCNNInferer(thumb_mpp, thumb_size, classes, oversize, backend)

    def predict(self, prepared: PreparedSlide) -> dict[str, Any]:
        return self.inferer.predict(prepared, self.network)

    def __call__(self, prepared: PreparedSlide) -> float:
        return float(self.predict(prepared)["score"])
