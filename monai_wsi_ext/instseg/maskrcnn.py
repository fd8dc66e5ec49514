"""Mask R-CNN on the tile segmentation's tiles: tumor regions as instances, lesion candidates with a score.

The tiles, their masks, the tile reading and the restitching are the tile U-Net's (:mod:`monai_wsi_ext.tileseg`);
what changes is the network and what it is trained on:

* **Targets** (:func:`tile_instances`): the 8-connected tumor regions of a tile's mask are its instances (box,
  mask, class 1); regions under ``min_area`` pixels are dropped; ignored pixels (padding, unannotated tissue) count
  as background, since Mask R-CNN has no ignore label. A tile without tumor is a valid empty target.
* **Network** (:func:`build_maskrcnn`): torchvision's ``MaskRCNN`` with random weights (nothing downloaded; local
  weights optional, ``pretrained_path``) on a ResNet-FPN backbone (``resnet18``/``resnet34``/``resnet50``: torchvision's
  ``maskrcnn_resnet50_fpn`` architecture with ``resnet50``) or the CPU demo's ``small`` backbone (four conv stages
  and an FPN, 64 channels, light heads), images kept at their tile size (no resizing to 800 px), small anchors.
* **Training** (:class:`MaskRCNNTrainer`): MONAI's ``SupervisedTrainer`` with ``_iteration`` overridden: the
  network's own loss dictionary (RPN, box and mask losses) summed.
* **Validation and inference** see the network through :class:`MaskRCNNSemantic`: per tile, the per-pixel maximum
  of the mask probabilities of the detections scoring at least ``maskrcnn_min_score``, returned as logits so the
  tile U-Net's validation metrics and
  its inferer (:class:`~monai_wsi_ext.tileseg.infer.TileSegInferer`: sliding windows blended by
  :class:`~monai_wsi_ext.tileseg.infer.BlendMerger`) apply unchanged: the instance masks are restitched like the
  U-Net's probabilities. The wrapper also keeps each tile's detections in slide coordinates.
* **Instances across tile borders** (:func:`merge_instances`): the instances of the slide are the 8-connected
  regions of the post-processed restitched mask; every tile detection that overlaps a region belongs to it, so a
  lesion cut by a tile border (two detections, one per tile) is one instance. Its score, the lesion candidate's for
  the Camelyon16 FROC, is the best detection score among its detections; its point is its most probable pixel.
  :class:`InstanceWriter` writes them as ``<id>_candidates.json`` (read by ``evaluate.json`` with
  ``froc_candidates: "file"``) and ``<id>_instances.geojson``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from scipy import ndimage
from torch import nn
from torch.utils.data import Dataset

from monai_wsi_ext.engines.handlers import slide_batch_item
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import write_json_atomic

__all__ = ["BACKBONES", "DEFAULT_ANCHORS", "CANDIDATES_SUFFIX", "tile_instances", "InstanceTileDataset",
           "instance_collate", "build_maskrcnn", "MaskRCNNTrainer", "MaskRCNNSemantic", "merge_instances",
           "MaskRCNNInferer", "InstanceWriter"]

logger = logging.getLogger(__name__)

#: backbones of :func:`build_maskrcnn`
BACKBONES = ("small", "resnet18", "resnet34", "resnet50")
#: file of a slide's lesion candidates (level-0 points with scores)
CANDIDATES_SUFFIX = "_candidates.json"
_EIGHT = np.ones((3, 3), bool)


def tile_instances(target: np.ndarray | torch.Tensor, min_area: int = 4) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets of one tile: its 8-connected tumor regions (``target == 1``) as instances.

    Args:
        target: ``(T, T)`` or ``(1, T, T)`` tile targets (1 tumor, 0 not, -1 ignored: treated as background).
        min_area: smallest region kept, in pixels.

    Returns:
        ``{"boxes": (N, 4) float32 x0, y0, x1, y1 (pixel edges), "labels": (N,) int64 ones, "masks": (N, T, T)
        uint8}``.
    """
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    t = t.reshape(t.shape[-2:])
    lab, n = ndimage.label(t == 1, structure=_EIGHT)
    boxes, masks = [], []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab == i
        if int(m.sum()) < int(min_area):
            continue
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        masks.append(m)
    h, w = t.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": (torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks
                      else torch.zeros((0, h, w), dtype=torch.uint8))}


class InstanceTileDataset(Dataset):
    """The tile segmentation's training tiles with their instances: items of a
    :class:`~monai_wsi_ext.tileseg.tiles.TileSegDataset` (jitter and augmentation included) with ``targets``
    (:func:`tile_instances`) added.

    Args:
        tiles: the tile dataset.
        min_area: smallest instance, pixels.
    """

    def __init__(self, tiles: Dataset, min_area: int = 4):
        self.tiles, self.min_area = tiles, int(min_area)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def labels(self) -> np.ndarray:
        return self.tiles.labels

    def __getitem__(self, index: int) -> dict:
        item = dict(self.tiles[index])
        item["targets"] = tile_instances(item["label"], self.min_area)
        return item


def instance_collate(batch: Sequence[Mapping]) -> dict:
    """``{"image": (B, 3, T, T), "label": (B, 1, T, T), "targets": [B dicts]}`` of instance tiles."""
    return {"image": torch.stack([b["image"] for b in batch]), "label": torch.stack([b["label"] for b in batch]),
            "targets": [b["targets"] for b in batch]}


class _SmallBackbone(nn.Module):
    """Four (conv, BN, ReLU) x 2 stages with stride 2 each: feature maps at 1/2 .. 1/16; the FPN takes the last
    three and adds a max-pool level (four anchor levels: 1/4 .. 1/32)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        stages, cin = [], 3
        for cout in channels:
            stages.append(nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                                        nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                        nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> OrderedDict:
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


class _SmallFPN(nn.Module):
    def __init__(self, channels: Sequence[int], out_channels: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = _SmallBackbone(channels)
        self.fpn = FeaturePyramidNetwork(list(channels)[1:], out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = int(out_channels)

    def forward(self, x: torch.Tensor) -> OrderedDict:
        feats = self.body(x)
        feats.pop("0")  # the 1/2-resolution stage feeds the next one only: an FPN level there costs most
        return self.fpn(feats)


#: default anchor sizes (pixels, one per FPN level) of each backbone family
DEFAULT_ANCHORS = {"small": (16, 32, 64, 128), "resnet": (16, 32, 64, 128, 256)}


def build_maskrcnn(backbone: str = "small", tile_size: int = 512, anchor_sizes: Sequence[int] | None = None,
                   trainable_layers: int = 5, pretrained_path: str | None = None, detections_per_img: int = 50,
                   score_thresh: float = 0.05, fpn_channels: int = 64) -> nn.Module:
    """A two-class (background, tumor) torchvision ``MaskRCNN`` for ``tile_size`` px tiles, random weights.

    Args:
        backbone: ``small`` (CPU demo), ``resnet18``, ``resnet34`` or ``resnet50`` (FPN on ResNet stages 1-4; with
            ``resnet50`` the architecture of ``maskrcnn_resnet50_fpn``).
        tile_size: the images' side; images are not resized (``min_size = max_size = tile_size``).
        anchor_sizes: one anchor size per FPN level (pixels; ``small``: 4 levels, default 16-128; ResNets: 5
            levels, default 16-256).
        trainable_layers: ResNet stages trained (5: all).
        pretrained_path: a local state dict of the whole network (e.g. converted COCO weights); nothing is
            downloaded.
        detections_per_img: detections kept per tile.
        score_thresh: smallest detection score kept.
        fpn_channels: FPN width of the ``small`` backbone (the ResNets use 256).

    Raises:
        ConfigError: an unknown backbone, a bad anchor list or a missing weights file.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    if backbone not in BACKBONES:
        raise ConfigError(f"`maskrcnn_backbone` must be one of {BACKBONES}, got {backbone!r}.")
    levels = 4 if backbone == "small" else 5
    anchor_sizes = DEFAULT_ANCHORS["small" if backbone == "small" else "resnet"] if anchor_sizes is None \
        else anchor_sizes
    if len(anchor_sizes) != levels:
        raise ConfigError(f"`maskrcnn_anchor_sizes` needs one size per FPN level ({levels} for {backbone!r}), got "
                          f"{list(anchor_sizes)!r}.")
    anchors = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    common = dict(num_classes=2, min_size=int(tile_size), max_size=int(tile_size), rpn_anchor_generator=anchors,
                  box_detections_per_img=int(detections_per_img), box_score_thresh=float(score_thresh),
                  rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=250, rpn_pre_nms_top_n_test=300,
                  rpn_post_nms_top_n_test=100, box_batch_size_per_image=32, rpn_batch_size_per_image=64)
    if backbone == "small":
        body = _SmallFPN((16, 32, 64, 128), int(fpn_channels))
        c = body.out_channels
        common["num_classes"] = None  # given by the predictors
        net = MaskRCNN(body, box_head=TwoMLPHead(c * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, 2),
                       mask_head=MaskRCNNHeads(c, (c, c), 1), mask_predictor=MaskRCNNPredictor(c, c, 2), **common)
    else:
        body = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=int(trainable_layers))
        net = MaskRCNN(body, **common)
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise ConfigError(f"`maskrcnn_pretrained_path` {pretrained_path!r} not found.")
        state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        logger.info("Mask R-CNN weights from %s (%d missing, %d unexpected)", pretrained_path, len(missing),
                    len(unexpected))
    return net


class MaskRCNNTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` for torchvision detection models: an iteration feeds ``image`` (a batch of
    tiles) and ``targets`` (one dict per tile) to the network in training mode and minimises the sum of the loss
    dictionary it returns. ``engine.state.output`` holds ``loss`` and each part (``loss_mask``, ``loss_box_reg``,
    ...); ``IterationEvents`` fire as in the parent, so the usual handlers work. ``loss_function`` is unused."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("loss_function", lambda *a: None)
        super().__init__(*args, **kwargs)

    def _iteration(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images = batchdata["image"].to(engine.state.device)
        targets = [{k: v.to(engine.state.device) for k, v in t.items()} for t in batchdata["targets"]]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        losses = engine.network(list(images), targets)
        loss = sum(losses.values())
        engine.state.output = {Keys.IMAGE: images, Keys.LOSS: loss, **{k: v.detach() for k, v in losses.items()}}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class MaskRCNNSemantic(nn.Module):
    """A detection network seen as a segmentation network: ``(B, 3, T, T)`` -> ``(B, 2, T, T)`` logits whose
    softmax's tumor channel is the per-pixel maximum of the mask probabilities of the detections scoring at least
    ``min_score`` (``eps`` without any): the usual reading of Mask R-CNN output (keep confident detections, their
    masks at 0.5), as a map. The scores themselves rank the lesion candidates (:func:`merge_instances`). With
    ``keep_detections`` the detections of each call are kept in ``detections`` for :func:`merge_instances`.

    Args:
        detector: a torchvision Mask R-CNN (:func:`build_maskrcnn`).
        min_score: smallest score of a detection whose mask enters the map.
        eps: probability floor of the logit.
    """

    def __init__(self, detector: nn.Module, min_score: float = 0.3, eps: float = 1e-4):
        super().__init__()
        if not 0.0 <= float(min_score) < 1.0:
            raise ConfigError(f"`maskrcnn_min_score` must be in [0, 1), got {min_score!r}.")
        self.detector, self.min_score, self.eps = detector, float(min_score), float(eps)
        self.keep_detections = False
        self.detections: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.detector.training
        self.detector.eval()
        with torch.no_grad():
            outs = self.detector(list(x))
        self.detector.train(was_training)
        maps = []
        for out in outs:
            masks = out["masks"][:, 0] if len(out["masks"]) else x.new_zeros((0, *x.shape[-2:]))
            keep = out["scores"] >= self.min_score
            p = masks[keep].amax(dim=0) if bool(keep.any()) else x.new_zeros(x.shape[-2:])
            maps.append(p)
            if self.keep_detections:
                self.detections.append({"scores": out["scores"].cpu(), "masks": masks.cpu(),
                                        "boxes": out["boxes"].cpu()})
        p = torch.stack(maps)[:, None].clamp(self.eps, 1 - self.eps)
        # two-channel logits whose softmax is (1 - p, p): the tile U-Net's metrics and inferer apply unchanged
        return torch.cat([torch.zeros_like(p), torch.log(p) - torch.log1p(-p)], dim=1)


def merge_instances(mask: np.ndarray, prob: np.ndarray, detections: Sequence[Mapping[str, Any]] = (),
                    mask_threshold: float = 0.5) -> tuple[np.ndarray, list[dict]]:
    """The slide's instances: 8-connected regions of the restitched, post-processed tumor ``mask``, each with the
    tile detections that overlap it.

    Args:
        mask: ``(H, W)`` bool tumor mask at the target resolution (after post-processing).
        prob: ``(H, W)`` restitched probability (NaN off tissue).
        detections: tile detections in target-pixel coordinates: ``{"score", "mask" (h, w) float, "origin" (y, x)
            of the tile}``.
        mask_threshold: a detection covers the pixels where its mask probability is above this.

    Returns:
        ``(labels (H, W) int32, instances)``; each instance: ``id`` (its label), ``score`` (best overlapping
        detection score; the region's maximum probability when no detection overlaps), ``n_detections`` (tile
        detections merged into it), ``area_px``, ``bbox`` (x0, y0, x1, y1 target px), ``peak`` (y, x target px of
        its most probable pixel).
    """
    m = np.asarray(mask, bool)
    labels, n = ndimage.label(m, structure=_EIGHT)
    p = np.nan_to_num(np.asarray(prob, np.float64), nan=0.0)
    best = np.zeros(n + 1)
    count = np.zeros(n + 1, np.int64)
    rows, cols = m.shape
    for det in detections:
        y0, x0 = (int(v) for v in det["origin"])
        dm = np.asarray(det["mask"]) > mask_threshold
        h, w = dm.shape
        ys, xs = slice(max(y0, 0), min(y0 + h, rows)), slice(max(x0, 0), min(x0 + w, cols))
        if ys.stop <= ys.start or xs.stop <= xs.start:
            continue
        sub = dm[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        hit = np.unique(labels[ys, xs][sub])
        hit = hit[hit > 0]
        for h_ in hit:
            best[h_] = max(best[h_], float(det["score"]))
            count[h_] += 1
    instances = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = labels[sl] == i
        local = np.where(region, p[sl], -1.0)
        py, px = np.unravel_index(int(np.argmax(local)), local.shape)
        instances.append({"id": i, "score": float(best[i]) if count[i] else float(local.max()),
                          "n_detections": int(count[i]), "area_px": int(region.sum()),
                          "bbox": [int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop)],
                          "peak": [int(py + sl[0].start), int(px + sl[1].start)]})
    return labels.astype(np.int32), instances


class MaskRCNNInferer:
    """:class:`~monai_wsi_ext.tileseg.infer.TileSegInferer` for a :class:`MaskRCNNSemantic` network: the same
    sliding windows and blending, and the tile detections in target-pixel coordinates (``detections`` of the
    output) for :func:`merge_instances`. Arguments as :class:`~monai_wsi_ext.tileseg.infer.TileSegInferer`."""

    def __init__(self, **kwargs):
        from monai_wsi_ext.tileseg.infer import TileSegInferer

        self.tiles = TileSegInferer(**kwargs)
        self.target_mpp = self.tiles.target_mpp
        self.splitter = self.tiles.splitter

    def predict(self, view, network: nn.Module, tissue=None) -> tuple[np.ndarray, Any, list[dict]]:
        """Infer the (tissue) tiles of a :class:`~monai_wsi_ext.tileseg.tiles.SlideAtMpp` view: ``(merged (1, H,
        W) probability, splitter, detections)``: the detections scoring at least the network's ``min_score``, each
        ``{"score", "mask"}`` (its mask at 0.5, cropped to its box) and the ``origin`` ``(y, x)`` of the crop in
        target pixels."""
        if not isinstance(network, MaskRCNNSemantic):
            raise ConfigError("the Mask R-CNN inferer needs a MaskRCNNSemantic network (infer_maskrcnn.json).")
        network.detections, network.keep_detections = [], True
        try:
            merged, splitter = self.tiles.predict(view, network, tissue)
        finally:
            network.keep_detections = False
        # the network saw the tiles in the splitter's order (PatchInferer keeps it)
        locations = splitter.locations(view)
        if len(locations) != len(network.detections):
            raise MonaiWsiExtError(f"{view.slide.path}: {len(network.detections)} tile outputs for "
                                   f"{len(locations)} tiles.")
        dets = []
        for (y, x), d in zip(locations, network.detections):
            for score, mask in zip(d["scores"].tolist(), d["masks"].numpy()):
                if score < network.min_score:
                    continue
                on = mask > 0.5  # kept as a boolean crop of its box: a slide's detections stay small
                if not on.any():
                    continue
                rr, cc = np.nonzero(on)
                r0, c0 = int(rr.min()), int(cc.min())
                dets.append({"score": float(score), "mask": on[r0:rr.max() + 1, c0:cc.max() + 1],
                             "origin": (int(y) + r0, int(x) + c0)})
        network.detections = []
        return merged, splitter, dets

    def __call__(self, inputs: dict, network: nn.Module | None = None) -> dict[str, Any]:
        import time

        from monai_wsi_ext.tileseg.tiles import SlideAtMpp, prepared_tissue

        t0 = time.perf_counter()
        t = self.tiles
        prepared = inputs["prepared"]
        view = SlideAtMpp(prepared.open(t.backend), t.target_mpp, num_workers=t.num_workers)
        merged, splitter, dets = self.predict(view, network, prepared_tissue(prepared, t.backend))
        seconds = time.perf_counter() - t0
        logger.info("%s: %d tile(s), %d detection(s) in %.1f s", prepared.slide_id, splitter.n_tiles, len(dets),
                    seconds)
        return {"pixel_prob": merged[0], "downsample": view.downsample, "target_mpp": t.target_mpp,
                "tiles": splitter.n_tiles, "positions": splitter.n_positions, "seconds": round(seconds, 2),
                "detections": dets}


class InstanceWriter:
    """After each slide of ``infer_maskrcnn.json``: the instances of the restitched mask (:func:`merge_instances`
    with the run's post-processing) as lesion candidates ``<id>_candidates.json`` (``probs``, level-0 ``x``, ``y``,
    and per instance its detections, area and box) and QuPath points; attach it before the tile writer, whose
    record marks the slide complete.

    Args:
        output_dir: one folder per slide.
        postprocess: the run's :class:`~monai_wsi_ext.tileseg.postprocess.TileSegPostprocess`.
        backend: slide reader backend (tissue mask).
    """

    def __init__(self, output_dir: str, postprocess, backend: str = "auto"):
        self.output_dir, self.postprocess, self.backend = Path(output_dir), postprocess, backend

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai_wsi_ext.tileseg.masks import sample_mask
        from monai_wsi_ext.tileseg.tiles import prepared_tissue

        out = engine.state.output
        if out is None or out.get(Keys.PRED) is None:
            return
        item = slide_batch_item(engine)
        prepared, pred = item["prepared"], out[Keys.PRED]
        prob, ds = pred["pixel_prob"], float(pred["downsample"])
        tissue = prepared_tissue(prepared, self.backend)
        result = self.postprocess(prob, sample_mask(tissue.mask, tissue.downsample, prob.shape, ds, fill=False),
                                  pixel_um=float(pred["target_mpp"]))
        _, instances = merge_instances(result.mask, result.prob, pred.get("detections", ()))
        for inst in instances:
            inst["x"], inst["y"] = (inst["peak"][1] + 0.5) * ds, (inst["peak"][0] + 0.5) * ds
        instances.sort(key=lambda r: -r["score"])
        sid = prepared.slide_id
        doc = {"slide_id": sid, "downsample": ds, "probs": [r["score"] for r in instances],
               "x": [r["x"] for r in instances], "y": [r["y"] for r in instances], "instances": instances,
               "tile_detections": len(pred.get("detections", ()))}
        (self.output_dir / sid).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output_dir / sid / f"{sid}{CANDIDATES_SUFFIX}", doc)
        pred["n_instances"] = len(instances)
        logger.info("%s: %d instance(s) from %d tile detection(s)", sid, len(instances), doc["tile_detections"])
