"""Baselines of the paper's comparison (Takahama et al., ICCV 2019, section 4.2.1) that need code of their own.

* **Segmentation only**: a U-Net on the RGB slide image downsampled to fit (the paper: 1/8 of the original
  resolution). :class:`SlideImageDataset` reads each prepared slide at ``1 / downsample`` of level 0, cropped to
  the patch grid, so that every grid cell is exactly ``cell_size / downsample`` pixels (``pixels_per_cell``);
  the label image is the patch grid's labels at the same scale (one block per cell; nolabel and background are
  ignored by the loss), i.e. the same supervision every other method sees. :class:`SegmentationInferer`
  predicts the whole image with a sliding window and maps the tumor probability back onto the patch grid as the
  mean over each cell's pixels; ``baseline_segmentation.json`` runs it in the
  :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` with the
  :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter`, so it writes the same heatmap folder as
  :class:`~monai_wsi_ext.inference.slides.SlideInference` and the same evaluation applies
  (:class:`SegmentationPredictor` builds the same components from Python).
* **Frozen features**: an encoder never trained on patches (random init, or ``pretrained_path`` weights for the
  backbone), frozen, whose canvases train the U-Net. :func:`frozen_encoder` builds it from its own seed, so that
  feature extraction and inference get identical weights in any process and whatever else drew random numbers
  first. (The classifier-only baseline needs no code: ``inference.json`` with ``mode: classifier``.)

Memory and speed of the segmentation baseline: the downsampled slides are kept in memory (``3 x H x W`` bytes
each: a 100k x 200k Camelyon16 slide at 1/8 is about 1 GB, at 1/32 about 60 MB); on a CPU use a coarse
``downsample`` for real slides.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader, Dataset

from monai_wsi_ext.engines.e2e import slide_collate
from monai_wsi_ext.engines.evaluators import SlideEvaluator
from monai_wsi_ext.engines.handlers import StrictCheckpointLoader
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.inference.slides import SlideDataset
from monai_wsi_ext.io.wsi import Slide, SlideReader, open_slide
from monai_wsi_ext.model.canvas import IGNORE_INDEX
from monai_wsi_ext.model.predict import eval_mode
from monai_wsi_ext.outputs.handlers import HeatmapWriter, InferenceSummary
from monai_wsi_ext.prep.prepare import PreparedSlide, load_prepared_slides
from monai_wsi_ext.utils import module_device, resolve_device

__all__ = [
    "frozen_encoder",
    "pixels_per_cell",
    "read_grid_image",
    "label_image",
    "cell_means",
    "SlideImageDataset",
    "SegmentationInferer",
    "SegmentationPredictor",
]

logger = logging.getLogger(__name__)


def frozen_encoder(seed: int = 0, **encoder_kwargs: Any) -> torch.nn.Module:
    """A :class:`~monai_wsi_ext.model.networks.PatchEncoder` whose random layers come from ``seed`` alone.

    The global torch RNG is forked, seeded, used for the construction and restored, so the weights do not depend
    on what ran before (e.g. whether the U-Net was built first). ``pretrained_path`` in ``encoder_kwargs`` loads
    backbone weights as usual; the feature layer stays a seeded random projection.

    Args:
        seed: seed of the random initialisation.
        encoder_kwargs: :class:`~monai_wsi_ext.model.networks.PatchEncoder` arguments (``backbone``, ``feature_dim``,
            ``num_classes``, ``pretrained_path``...).

    Returns:
        The encoder in eval mode with ``requires_grad`` off (frozen).
    """
    from monai_wsi_ext.model.networks import PatchEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = PatchEncoder(**encoder_kwargs)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def pixels_per_cell(cell_size: float, downsample: float) -> int:
    """Image pixels per grid cell at ``1 / downsample`` of level 0.

    Raises:
        ConfigError: when ``cell_size / downsample`` is not a positive integer.
    """
    ppc = float(cell_size) / float(downsample)
    if ppc < 1 or abs(ppc - round(ppc)) > 1e-6:
        raise ConfigError(f"`downsample` {downsample} must divide the grid cell size {cell_size} (level-0 px) into "
                          "a whole number >= 1 of pixels per cell; e.g. 8 for 64- or 256-px cells.")
    return int(round(ppc))


def read_grid_image(meta: PreparedSlide, downsample: float, backend: str = "auto", strip_cells: int = 64,
                    slide: Slide | None = None) -> np.ndarray:
    """The slide's RGB image at ``1 / downsample`` of level 0 over the patch grid's extent.

    The image has ``(rows * ppc, cols * ppc, 3)`` pixels for a ``(rows, cols)`` grid with ``ppc`` from
    :func:`pixels_per_cell`; it is read from the closest finer pyramid level in strips of ``strip_cells`` grid
    rows and resized with a box filter, so a whole level is never held in memory.

    Args:
        meta: a prepared slide (:class:`~monai_wsi_ext.prep.prepare.PreparedSlide`).
        downsample: level-0 pixels per image pixel.
        backend: slide reader backend.
        strip_cells: grid rows per read.
        slide: the slide, already open (it stays open); None opens it for the read and closes it.

    Returns:
        ``uint8`` array ``(H, W, 3)``.
    """
    from PIL import Image

    grid = meta.grid
    cell = float(grid.cell_size)
    ppc = pixels_per_cell(cell, downsample)
    if slide is None:
        with open_slide(meta.image, backend=backend, mpp=meta.reader_mpp) as opened:
            return read_grid_image(meta, downsample, backend, strip_cells, slide=opened)
    rows, cols = grid.shape
    out = np.empty((rows * ppc, cols * ppc, 3), np.uint8)
    level = slide.best_level_for_downsample(downsample)
    lds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    for r0 in range(0, rows, strip_cells):
        r1 = min(rows, r0 + strip_cells)
        y0 = int(round(r0 * cell))
        width = min(int(math.ceil(cols * cell / lds)), lw)
        height = min(int(math.ceil((r1 - r0) * cell / lds)), lh - int(y0 / lds))
        region = slide.read_region(0, y0, width, max(height, 1), level)
        img = Image.fromarray(region).resize((cols * ppc, (r1 - r0) * ppc), Image.Resampling.BOX)
        out[r0 * ppc:r1 * ppc] = np.asarray(img)
    return out


def label_image(label_grid: np.ndarray, ppc: int) -> np.ndarray:
    """The grid's labels at image scale: tumor 1, normal 0, nolabel/background :data:`IGNORE_INDEX`.

    Args:
        label_grid: ``(rows, cols)`` labels (1, 0, -1 nolabel, -2 background).
        ppc: pixels per cell.

    Returns:
        ``int64`` array ``(rows * ppc, cols * ppc)``.
    """
    lab = np.asarray(label_grid, np.int64).copy()
    lab[lab < 0] = IGNORE_INDEX
    return np.repeat(np.repeat(lab, ppc, axis=0), ppc, axis=1)


def cell_means(prob_image: np.ndarray, ppc: int, grid_shape: Sequence[int]) -> np.ndarray:
    """Mean of a ``(rows * ppc, cols * ppc)`` image over each grid cell: a ``(rows, cols)`` float32 grid."""
    rows, cols = int(grid_shape[0]), int(grid_shape[1])
    img = np.asarray(prob_image, np.float64)[: rows * ppc, : cols * ppc]
    if img.shape != (rows * ppc, cols * ppc):
        raise ValueError(f"`prob_image` {np.shape(prob_image)} is smaller than the grid {rows}x{cols} of "
                         f"{ppc} px cells.")
    return img.reshape(rows, ppc, cols, ppc).mean(axis=(1, 3)).astype(np.float32)


class SlideImageDataset(Dataset):
    """Downsampled slide images and label images of the prepared slides of a split (segmentation-only baseline).

    Training items (``train=True``) are random ``crop_size`` crops (zero-padded when the image is smaller; the
    padding is ignored by the loss) anchored on a labelled pixel, randomly rotated by 90° and flipped. Evaluation
    items are whole images (use ``batch_size=1`` and a ``SlidingWindowInferer``).

    Items: ``image`` ``(3, H, W)`` float in [0, 1], ``label`` ``(H, W)`` long, ``slide_id``.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        split: split(s) to use (None: all).
        downsample: level-0 pixels per image pixel (8: the paper's 1/8).
        crop_size: training crop side in image pixels.
        train: random crops and augmentation, or whole images.
        seed: seed of the crops and augmentation.
        backend: slide reader backend.
    """

    def __init__(self, prepared_dir: str, split: str | Sequence[str] | None = "training", downsample: float = 8,
                 crop_size: int = 128, train: bool = True, seed: int = 0, backend: str = "auto"):
        self.crop_size, self.train = int(crop_size), bool(train)
        self.generator = np.random.default_rng(int(seed))
        self.items = []
        t0 = time.perf_counter()
        for meta in load_prepared_slides(prepared_dir, split):
            if len(meta.grid) == 0:
                continue
            ppc = pixels_per_cell(meta.grid.cell_size, downsample)
            image = read_grid_image(meta, downsample, backend)
            label = label_image(meta.grid.label_grid(), ppc)
            self.items.append({"slide_id": meta.slide_id, "image": image, "label": label,
                               "labelled": np.argwhere(label != IGNORE_INDEX)})
        if not self.items:
            raise MonaiWsiExtError(f"{prepared_dir}: no prepared slide with patches for split {split!r} "
                                   "(run scripts/prepare_dataset.py first)")
        logger.info("segmentation baseline: %d slide image(s) at 1/%g read in %.1f s", len(self.items), downsample,
                    time.perf_counter() - t0)

    def __len__(self) -> int:
        return len(self.items)

    def _crop(self, item: dict) -> tuple[np.ndarray, np.ndarray]:
        img, lab, c = item["image"], item["label"], self.crop_size
        h, w = lab.shape
        if len(item["labelled"]):
            cy, cx = item["labelled"][self.generator.integers(len(item["labelled"]))]
        else:
            cy, cx = self.generator.integers(h), self.generator.integers(w)
        y0 = int(np.clip(cy - self.generator.integers(c), -max(c - h, 0), max(h - c, 0)))
        x0 = int(np.clip(cx - self.generator.integers(c), -max(c - w, 0), max(w - c, 0)))
        out_img = np.zeros((c, c, 3), np.uint8)
        out_lab = np.full((c, c), IGNORE_INDEX, np.int64)
        sy, sx = max(y0, 0), max(x0, 0)
        ey, ex = min(y0 + c, h), min(x0 + c, w)
        out_img[sy - y0:ey - y0, sx - x0:ex - x0] = img[sy:ey, sx:ex]
        out_lab[sy - y0:ey - y0, sx - x0:ex - x0] = lab[sy:ey, sx:ex]
        k = int(self.generator.integers(4))
        out_img, out_lab = np.rot90(out_img, k), np.rot90(out_lab, k)
        if self.generator.random() < 0.5:
            out_img, out_lab = out_img[:, ::-1], out_lab[:, ::-1]
        return out_img, out_lab

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        img, lab = self._crop(item) if self.train else (item["image"], item["label"])
        image = torch.from_numpy(np.ascontiguousarray(img).transpose(2, 0, 1).copy()).float() / 255.0
        return {Keys.IMAGE: image, Keys.LABEL: torch.from_numpy(np.ascontiguousarray(lab).copy()),
                "slide_id": item["slide_id"]}


class SegmentationInferer:
    """The segmentation-only baseline as a slide inferer for the
    :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator`: the slide's RGB image at ``1 / downsample`` over the
    patch grid (:func:`read_grid_image`), the U-Net (the ``network`` the evaluator passes) over it with a sliding
    window, and the mean tumor probability over each grid cell's pixels (:func:`cell_means`).

    ``inferer(item, network)`` takes a slide item with ``prepared`` (a
    :class:`~monai_wsi_ext.prep.prepare.PreparedSlide`; its slide is opened once and left open for the heatmap
    writer's thumbnail, the evaluator closes it) and returns ``{"probs": (N,) float32}`` in patch-table order, as
    :class:`~monai_wsi_ext.model.predict.CanvasInferer` does, for the
    :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter`.

    Args:
        downsample: level-0 pixels per image pixel, as in training (the paper: 8).
        inferer: the window inferer over the image (default: MONAI's ``SlidingWindowInferer`` with ``roi_size``,
            ``sw_batch_size``, ``overlap`` and gaussian weighting).
        roi_size: sliding-window side in image pixels (with ``inferer=None``).
        sw_batch_size: windows per forward pass (with ``inferer=None``).
        overlap: sliding-window overlap (with ``inferer=None``).
        backend: slide reader backend.
    """

    def __init__(self, downsample: float = 8, inferer=None, roi_size: int = 128, sw_batch_size: int = 4,
                 overlap: float = 0.25, backend: str = "auto"):
        if inferer is None:
            from monai.inferers import SlidingWindowInferer

            inferer = SlidingWindowInferer(roi_size=(int(roi_size), int(roi_size)), sw_batch_size=int(sw_batch_size),
                                           overlap=float(overlap), mode="gaussian")
        self.downsample, self.inferer, self.backend = downsample, inferer, backend

    def predict_image(self, image: np.ndarray, network: torch.nn.Module) -> np.ndarray:
        """``(H, W, 3)`` uint8 image -> ``(H, W)`` float32 tumor probability, in eval mode."""
        dev, _ = module_device(network)
        x = torch.from_numpy(np.ascontiguousarray(image).transpose(2, 0, 1).copy()).float()[None] / 255.0
        with eval_mode(network), torch.inference_mode():
            logits = self.inferer(x.to(dev), network)
        return torch.softmax(logits.float(), dim=1)[0, 1].cpu().numpy()

    def __call__(self, inputs: dict, network: torch.nn.Module | None = None) -> dict:
        if network is None:
            raise ValueError("the segmentation inferer needs the RGB U-Net as `network`.")
        prepared = inputs["prepared"]
        grid = prepared.grid
        ppc = pixels_per_cell(grid.cell_size, self.downsample)
        image = read_grid_image(prepared, self.downsample, self.backend, slide=prepared.open(self.backend))
        cells = cell_means(self.predict_image(image, network), ppc, grid.shape)
        return {"probs": cells[grid.rows, grid.cols]}


class SegmentationPredictor:
    """Segmentation-only heatmaps from Python, with the components ``baseline_segmentation.json`` declares: a
    :class:`~monai_wsi_ext.inference.slides.SlideDataset` over the prepared slides of ``split``, the
    :class:`SegmentationInferer`, strict loading of ``checkpoint`` (option ``seg_ckpt``), the
    :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter` and the
    :class:`~monai_wsi_ext.outputs.handlers.InferenceSummary` (``mode: segmentation``), run by the
    :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator`. The outputs are those of
    :class:`~monai_wsi_ext.inference.slides.SlideInference` (``<output_dir>/<id>/<id>_prob.npy``, ``_labels.npy``,
    PNG/TIFF/GeoJSON/overlay and, last, ``_record.json``; ``inference_summary.json``), with the same crash safety:
    atomic files, no record for an incomplete slide, temporary files of a killed run removed.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        output_dir: heatmap folder.
        network: the RGB U-Net (3 -> 2 channels).
        checkpoint: its weights file (None: use ``network`` as is).
        split: split(s) to predict.
        downsample: as in training.
        roi_size: sliding-window size in image pixels.
        sw_batch_size: windows per forward pass.
        overlap: sliding-window overlap.
        threshold: tumor threshold of the written regions.
        device: ``cpu``, ``cuda`` or ``auto``.
        backend: slide reader backend.
        config: configuration to record.
    """

    def __init__(self, prepared_dir: str, output_dir: str, network: torch.nn.Module, checkpoint: str | None = None,
                 split: str | Sequence[str] | None = "test", downsample: float = 8, roi_size: int = 128,
                 sw_batch_size: int = 4, overlap: float = 0.25, threshold: float = 0.5, device="auto",
                 backend: str = "auto", config: dict | None = None):
        self.output_dir, self.downsample = Path(output_dir), downsample
        self.device = resolve_device(device)
        self.network = network.to(self.device)
        self.dataset_args = dict(prepared_dir=str(prepared_dir), split=split, reader=SlideReader(backend=backend))
        self.inferer = SegmentationInferer(downsample, roi_size=roi_size, sw_batch_size=sw_batch_size,
                                           overlap=overlap, backend=backend)
        self.loader = StrictCheckpointLoader(checkpoint, self.network, "seg_ckpt")
        self.writer = HeatmapWriter(output_dir, threshold, config=config, weights={"segmentation_unet": checkpoint},
                                    backend=backend)

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 image -> ``(H, W)`` float32 tumor probability."""
        return self.inferer.predict_image(image, self.network)

    def run(self) -> dict:
        """Predict every slide of the split; a slide that fails is reported and the others go on.

        The checkpoint is loaded first (what the config's ``StrictCheckpointLoader`` does when the run starts), so
        a checkpoint that does not fit fails before any slide is listed or read.

        Returns:
            The summary (``mode``, ``slides``, ``failed``, ``output_dir``).

        Raises:
            ConfigError: when the checkpoint does not fit the network, or there is no prepared slide in the split.
            MonaiWsiExtError: at the end, when any slide failed.
        """
        self.loader()
        loader = DataLoader(SlideDataset(**self.dataset_args), batch_size=1, collate_fn=slide_collate, num_workers=0)
        evaluator = SlideEvaluator(self.device, loader, network=self.network, inferer=self.inferer, on_failure="skip",
                                   val_handlers=[self.writer, InferenceSummary(self.output_dir, "segmentation")])
        evaluator.run()
        return evaluator.state.summary
