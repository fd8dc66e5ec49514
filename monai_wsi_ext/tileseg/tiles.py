"""Tiles at the target resolution: reading, the training dataset, the loss and the validation metrics.

:class:`SlideAtMpp` reads any window of a slide at the target resolution through the project's reader
(:class:`~monai_wsi_ext.io.wsi.Slide`): from the coarsest pyramid level at least as fine as the target, only the
level pixels under the window, area-averaged onto the target pixels (an exact block mean when the target is an
integer downsample of the level), and padded with white (glass) where the window reaches past the slide. The
full-resolution slide is never held.

:class:`TileSegDataset` lays non-overlapping tiles (default 512 px) over each prepared slide of a split, keeps the
tissue tiles (:mod:`monai_wsi_ext.prep.tissue`'s mask, ``min_tissue``), and gives each tile its mask rasterised
from the slide's annotation at the target resolution (:class:`~monai_wsi_ext.tileseg.masks.SlideLabels`).
Training tiles are jittered around their grid position and augmented by :class:`TileAugmentd` (rotation by
multiples of 90°, flip, and the colour part of the paper's augmentation,
:func:`~monai_wsi_ext.data.patches.adjust_colour_batch`); :func:`tile_sampler` draws tumor and tumor-free tiles
equally often (:func:`~monai_wsi_ext.data.patches.balanced_sampler`).

:class:`MaskedDiceCELoss` is MONAI's ``DiceCELoss`` with ignored pixels (padding past the slide, unannotated tissue
of non-exhaustive annotations); :class:`PooledDice` and :class:`PixelAccuracy` are the validation's pixel metrics,
pooled over every tile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.losses import DiceCELoss
from monai.transforms import Randomizable
from torch.utils.data import Dataset, RandomSampler, Sampler

from monai_wsi_ext.data.patches import SlideCache, adjust_colour_batch, balanced_sampler
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.wsi import Slide
from monai_wsi_ext.labels import IGNORE_INDEX, MASK_TUMOR
from monai_wsi_ext.prep.prepare import PreparedSlide, load_prepared_slides
from monai_wsi_ext.prep.tissue import TissueMask, detect_tissue, load_mask_png
from monai_wsi_ext.tileseg.masks import SlideLabels, TargetGeometry, sample_mask, target_geometry, tile_fractions, \
    tile_targets

__all__ = [
    "PAD_VALUE",
    "SlideAtMpp",
    "tile_grid",
    "prepared_tissue",
    "tile_tensors",
    "TileAugmentd",
    "TileSegDataset",
    "tile_sampler",
    "MaskedDiceCELoss",
    "PooledDice",
    "PixelAccuracy",
]

logger = logging.getLogger(__name__)

#: RGB value of the padding past the slide border (white: glass)
PAD_VALUE = 255


class SlideAtMpp:
    """A slide seen at a target resolution: windows of target pixels read through the project's reader.

    Args:
        slide: an open slide (its ``mpp`` must be known: from the file or given to the reader).
        target_mpp: µm/px of the target grid.
        pad_value: RGB value of the pixels past the slide.
        num_workers: decoder threads of the batched reads (:meth:`read_tiles`).

    Attributes:
        geometry: the slide's :class:`~monai_wsi_ext.tileseg.masks.TargetGeometry`.
        level: the pyramid level read (the coarsest one whose downsample does not exceed the target's).
        factor: level pixels per target pixel (>= 1 unless the slide's level 0 is coarser than the target).
    """

    def __init__(self, slide: Slide, target_mpp: float, pad_value: int = PAD_VALUE, num_workers: int = 2):
        self.slide = slide
        self.geometry: TargetGeometry = target_geometry(slide.dimensions, slide.mpp, target_mpp, slide.path)
        self.level = slide.best_level_for_downsample(self.geometry.downsample)
        self.level_downsample = float(slide.level_downsamples[self.level])
        self.factor = self.geometry.downsample / self.level_downsample
        self.pad_value = int(pad_value)
        self.num_workers = int(num_workers)
        if self.factor < 1 - 1e-6:
            logger.warning("%s: the target %.4g µm/px is finer than the slide's level 0 (%.4g µm/px); tiles are "
                           "upsampled", slide.path, target_mpp, slide.mpp)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the slide at the target resolution."""
        return self.geometry.shape

    @property
    def downsample(self) -> float:
        """Level-0 pixels per target pixel."""
        return self.geometry.downsample

    def _window(self, x: float, y: float, width: int, height: int) -> tuple[int, int, int, int]:
        """Integer level window ``(X0, Y0, X1, Y1)`` under a target window."""
        f = self.factor
        x0, y0 = math.floor(x * f + 1e-9), math.floor(y * f + 1e-9)
        x1, y1 = math.ceil((x + width) * f - 1e-9), math.ceil((y + height) * f - 1e-9)
        return x0, y0, x1, y1

    def _axis(self, start: int, n: int, origin: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Area weights of one axis: target pixels ``start .. start + n`` over level pixels ``origin .. origin +
        size``; ``(index, weight)`` arrays of shape ``(n, K)``."""
        f = self.factor
        # edges in absolute level coordinates, then relative to the window: exact translations, so every tile
        # gives a pixel the same weights (the identity round trip is exact for any factor)
        edges = (start + np.arange(n + 1, dtype=np.float64)) * f - origin
        lo, hi = edges[:-1], edges[1:]
        first = np.floor(lo + 1e-9).astype(np.int64)
        k = max(int(math.ceil(f)) + 1, 1)
        idx = first[:, None] + np.arange(k)[None, :]
        weight = np.clip(np.minimum(idx + 1, hi[:, None]) - np.maximum(idx, lo[:, None]), 0.0, None)
        weight /= np.maximum(weight.sum(axis=1, keepdims=True), 1e-12)
        return np.clip(idx, 0, size - 1), weight.astype(np.float32)

    def _resample(self, region: np.ndarray, x: int, y: int, width: int, height: int, x0: int,
                  y0: int) -> np.ndarray:
        """The target window ``(x, y, width, height)`` of a level ``region`` whose top-left level pixel is
        ``(x0, y0)``: each target pixel the area-weighted mean of the level pixels it covers (an exact block mean
        for an integer factor), rounded to uint8."""
        f = self.factor
        if abs(f - 1.0) < 1e-9:
            return np.ascontiguousarray(region[y - y0:y - y0 + height, x - x0:x - x0 + width])
        iy, wy = self._axis(y, height, y0, region.shape[0])
        ix, wx = self._axis(x, width, x0, region.shape[1])
        img = region.astype(np.float32)
        rows = np.einsum("nk,nkwc->nwc", wy, img[iy], optimize=True)
        out = np.einsum("mk,nmkc->nmc", wx, rows[:, ix], optimize=True)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The ``(height, width, 3)`` uint8 RGB window whose top-left target pixel is ``(x, y)``; pixels past the
        slide (negative ``x``/``y`` included) are ``pad_value``."""
        x0, y0, x1, y1 = self._window(x, y, width, height)
        lw, lh = self.slide.level_dimensions[self.level]
        canvas = np.full((y1 - y0, x1 - x0, 3), self.pad_value, np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if cx1 > cx0 and cy1 > cy0:
            region = self.slide.read_region(int(round(cx0 * self.level_downsample)),
                                            int(round(cy0 * self.level_downsample)), cx1 - cx0, cy1 - cy0,
                                            self.level)
            canvas[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = region
        return self._resample(canvas, int(x), int(y), width, height, x0, y0)

    def read_tiles(self, locations: np.ndarray | Sequence[Sequence[int]], size: int,
                   batch_size: int = 16) -> Iterator[np.ndarray]:
        """Read square tiles, yielding ``(size, size, 3)`` uint8 arrays in the given order.

        Tiles inside the slide are read with the reader's batched path
        (:meth:`~monai_wsi_ext.io.wsi.Slide.read_regions`: cuCIM's native batches, a thread pool otherwise), tiles
        at the border one by one with padding; both give the same pixels as :meth:`read`.

        Args:
            locations: ``(N, 2)`` target-pixel ``(y, x)`` of each tile's top-left corner (MONAI's order).
            size: tile side in target pixels.
            batch_size: tiles per batched read.
        """
        locs = np.asarray(locations, np.int64).reshape(-1, 2)
        lw, lh = self.slide.level_dimensions[self.level]
        span = int(math.ceil(size * self.factor)) + 1
        for start in range(0, len(locs), int(batch_size)):
            chunk = locs[start:start + int(batch_size)]
            windows = [self._window(int(x), int(y), size, size) for y, x in chunk]
            inside = [i for i, (x0, y0, _, _) in enumerate(windows)
                      if x0 >= 0 and y0 >= 0 and x0 + span <= lw and y0 + span <= lh]
            out: list[np.ndarray | None] = [None] * len(chunk)
            if inside:
                level0 = [(int(round(windows[i][0] * self.level_downsample)),
                           int(round(windows[i][1] * self.level_downsample))) for i in inside]
                regions = np.concatenate(list(self.slide.read_regions(level0, (span, span), self.level,
                                                                      num_workers=self.num_workers,
                                                                      batch_size=len(inside))))
                for i, region in zip(inside, regions):
                    out[i] = self._resample(region, int(chunk[i][1]), int(chunk[i][0]), size, size, windows[i][0],
                                            windows[i][1])
            for i, tile in enumerate(out):
                yield tile if tile is not None else self.read(int(chunk[i][1]), int(chunk[i][0]), size, size)


def tile_grid(shape: Sequence[int], tile_size: int) -> np.ndarray:
    """``(N, 2)`` target-pixel ``(y, x)`` of the non-overlapping tiles covering a ``shape`` grid, row by row (the
    last row and column reach past the slide and are padded)."""
    rows, cols = int(shape[0]), int(shape[1])
    ys = np.arange(0, rows, int(tile_size))
    xs = np.arange(0, cols, int(tile_size))
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)


def prepared_tissue(prepared: PreparedSlide, backend: str = "auto") -> TissueMask:
    """The tissue mask of a prepared slide: the one prepared in this process, the prepared folder's
    ``tissue_mask.png``, or (neither) detected now with the default settings."""
    if prepared.tissue is not None:
        return prepared.tissue
    if prepared.dir is not None:
        path = Path(prepared.dir) / str(prepared.meta.get("tissue_mask", "tissue_mask.png"))
        if path.is_file():
            return load_mask_png(path)
    return detect_tissue(prepared.open(backend))


def tile_tensors(image: np.ndarray, target: np.ndarray) -> dict[str, torch.Tensor]:
    """``{"image": (3, h, w) float32 in [0, 1], "label": (1, h, w) int64}`` of a ``(h, w, 3)`` uint8 tile and its
    ``(h, w)`` targets."""
    img = torch.from_numpy(np.ascontiguousarray(np.asarray(image)[..., :3].transpose(2, 0, 1))).float().div_(255.0)
    return {"image": img, "label": torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64)[None].copy())}


class TileAugmentd(Randomizable):
    """Training augmentation of a tile and its mask: rotation by 0/90/180/270°, left-right flip (the two generate
    the eight symmetries of the square, applied to image and mask alike) and the colour part of the paper's
    augmentation on the image only (saturation, contrast, brightness and sharpness each scaled by a factor drawn
    from ``factor_range``, :func:`~monai_wsi_ext.data.patches.adjust_colour_batch`).

    Input: ``image`` ``(h, w, 3)`` uint8 and ``label`` ``(h, w)`` integer arrays; output: the tensors of
    :func:`tile_tensors`. The rotation and flip are done on the arrays (views, no arithmetic), the colour on the
    float image.

    Args:
        keys: ``(image key, label key)``.
        factor_range: range of the colour factors (the paper: 0.75-1.25); None turns colour off.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"),
                 factor_range: Sequence[float] | None = (0.75, 1.25)):
        self.keys = tuple(keys)
        self.factor_range = None if factor_range is None else (float(factor_range[0]), float(factor_range[1]))

    def randomize(self, data=None) -> None:
        self._k = int(self.R.randint(0, 4))
        self._flip = bool(self.R.rand() < 0.5)
        lo, hi = self.factor_range or (1.0, 1.0)
        self._factors = self.R.uniform(lo, hi, size=4)

    def __call__(self, data: Mapping) -> dict:
        self.randomize()
        d = dict(data)
        image_key, label_key = self.keys
        arrays = []
        for key in (image_key, label_key):
            a = np.rot90(np.asarray(d[key]), self._k, axes=(0, 1))
            arrays.append(a[:, ::-1] if self._flip else a)
        tensors = tile_tensors(*arrays)
        if self.factor_range is not None:
            fac = torch.as_tensor(self._factors, dtype=torch.float32)
            tensors["image"] = adjust_colour_batch(tensors["image"][None], *fac.unbind(0))[0].contiguous()
        d[image_key], d[label_key] = tensors["image"], tensors["label"]
        return d


class TileSegDataset(Dataset, Randomizable):
    """Tissue tiles of the prepared slides of a split at the target resolution, each with its mask.

    Per slide: the target geometry (``target_mpp``), the tissue mask of the preparation, the annotation
    (:class:`~monai_wsi_ext.tileseg.masks.SlideLabels`), and the non-overlapping ``tile_size`` grid over the
    slide; a tile is kept when at least ``min_tissue`` of it is tissue, and counts as a tumor tile (for
    :func:`tile_sampler`) when at least ``tumor_fraction`` of it is annotated tumor. A slide without an annotation
    file is used (all tumor-free) only when the preparation labelled it (declared negative, exhaustive); otherwise
    it is left out with a warning.

    Items: ``image`` float ``(3, T, T)`` in [0, 1], ``label`` int64 ``(1, T, T)`` (1 tumor, 0 not tumor,
    ``-1`` ignored: padding past the slide, unannotated tissue when not ``exhaustive``), ``slide_id``,
    ``location`` (target-pixel ``(y, x)``). With ``train`` the tile is moved by up to half its size from its grid
    position (``jitter``) and augmented (:class:`TileAugmentd`); the random draws come from this dataset's state
    (``set_random_state``; MONAI's ``DataLoader`` seeds each worker).

    Args:
        prepared_dir: output of ``prepare_dataset`` (``dataset_dir``).
        split: split(s) to use.
        target_mpp: µm/px every slide is resampled to.
        tile_size: tile side in target pixels.
        min_tissue: smallest tissue fraction of a kept tile.
        tumor_fraction: smallest tumor fraction of a tumor tile (class balance only; every pixel keeps its label).
        exhaustive: annotations outline all tumor (unannotated tissue is not tumor).
        class_map: class name -> label for polygon annotations.
        train: jitter and augment.
        jitter: move training tiles around their grid position.
        factor_range: colour augmentation range (None: no colour change).
        max_tiles: keep at most this many tiles (a seeded random choice; None: all).
        backend: slide reader backend.
        seed: seed of the random draws and of ``max_tiles``.
        label_mask_tumor_values: label-mask image values meaning tumor.
        label_mask_normal_values: label-mask image values meaning normal.

    Raises:
        MonaiWsiExtError: no prepared slide of the split has a tissue tile.
        ConfigError: a bad setting, or a slide without mpp.
    """

    def __init__(self, prepared_dir: str, split: str | Sequence[str] | None = "training", target_mpp: float = 1.0,
                 tile_size: int = 512, min_tissue: float = 0.25, tumor_fraction: float = 0.05,
                 exhaustive: bool = True, class_map: Mapping[str, str] | None = None, train: bool = True,
                 jitter: bool = True, factor_range: Sequence[float] | None = (0.75, 1.25),
                 max_tiles: int | None = None, backend: str = "auto", seed: int = 0,
                 label_mask_tumor_values: Sequence[int] = (1, 255), label_mask_normal_values: Sequence[int] = ()):
        if int(tile_size) < 16:
            raise ConfigError(f"`tile_size` must be at least 16 target pixels, got {tile_size!r}.")
        for name, value in (("min_tissue", min_tissue), ("tumor_fraction", tumor_fraction)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"`{name}` must be in [0, 1], got {value!r}.")
        self.tile_size, self.target_mpp = int(tile_size), float(target_mpp)
        self.train, self.jitter, self.exhaustive = bool(train), bool(jitter) and bool(train), bool(exhaustive)
        self.augment = TileAugmentd(factor_range=factor_range) if train else None
        self.cache = SlideCache(backend)
        self.set_random_state(seed)
        self.slides: list[dict] = []
        tiles, fractions = [], []
        for prepared in load_prepared_slides(prepared_dir, split):
            entry = self._slide_entry(prepared, class_map, label_mask_tumor_values, label_mask_normal_values)
            if entry is None:
                continue
            locs, tumor, annotated = self._slide_tiles(entry, float(min_tissue))
            if not self.exhaustive:
                keep = annotated > 0
                locs, tumor = locs[keep], tumor[keep]
            if len(locs) == 0:
                logger.warning("%s: no tile with >= %.0f%% tissue at %g µm/px", prepared.slide_id, 100 * min_tissue,
                               target_mpp)
                continue
            index = len(self.slides)
            self.slides.append(entry)
            tiles.append(np.concatenate([np.full((len(locs), 1), index, np.int64), locs], axis=1))
            fractions.append(tumor)
        if not tiles:
            raise MonaiWsiExtError(f"{prepared_dir}: no prepared slide with tissue tiles for split {split!r} at "
                                   f"{target_mpp} µm/px and {tile_size} px tiles (run scripts/prepare_dataset.py "
                                   "first, or lower `min_tissue`)")
        self.tiles = np.concatenate(tiles)
        self.tumor = np.concatenate(fractions).astype(np.float32)
        self.tumor_threshold = float(tumor_fraction)
        if max_tiles is not None and len(self.tiles) > int(max_tiles):
            pick = np.sort(np.random.RandomState(int(seed)).choice(len(self.tiles), int(max_tiles), replace=False))
            self.tiles, self.tumor = self.tiles[pick], self.tumor[pick]
        logger.info("tile segmentation: %d tile(s) of %d px at %g µm/px from %d slide(s), %d with tumor",
                    len(self.tiles), self.tile_size, self.target_mpp, len(self.slides), int(self.labels.sum()))

    def _slide_entry(self, prepared: PreparedSlide, class_map, tumor_values, normal_values) -> dict | None:
        meta = prepared.meta
        geometry = target_geometry(prepared.dimensions, prepared.mpp, self.target_mpp, prepared.image)
        annotation = meta.get("annotation")
        counts = meta.get("counts", {})
        if annotation is None and not (self.exhaustive and int(counts.get("normal", 0)) > 0):
            logger.warning("%s: no annotation and not declared tumor-free: left out of tile segmentation",
                           prepared.slide_id)
            return None
        labels = SlideLabels.from_file(annotation, prepared.dimensions, geometry.downsample, class_map=class_map,
                                       tumor_values=tumor_values, normal_values=normal_values)
        for note in labels.warnings:
            logger.warning("%s", note)
        return {"slide_id": prepared.slide_id, "image": prepared.image, "mpp": prepared.reader_mpp,
                "geometry": geometry, "labels": labels, "tissue": prepared_tissue(prepared)}

    def _slide_tiles(self, entry: dict, min_tissue: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kept tile positions ``(n, 2)`` and their tumor and annotated fractions."""
        geometry, tissue, labels = entry["geometry"], entry["tissue"], entry["labels"]
        d, size = geometry.downsample, self.tile_size
        locs = tile_grid(geometry.shape, size)
        y0, x0 = locs[:, 0] * d, locs[:, 1] * d
        frac = tile_fractions(tissue.mask, tissue.downsample, x0, y0, size * d, samples=16)
        keep = frac >= max(min_tissue, 1e-6)
        locs, y0, x0 = locs[keep], y0[keep], x0[keep]
        # labels on 16 x 16 points per tile: a coarse raster of the whole slide
        coarse = size * d / 16.0
        shape = (math.ceil(geometry.slide_size[1] / coarse), math.ceil(geometry.slide_size[0] / coarse))
        lab = labels.mask(shape, coarse)
        tumor = tile_fractions(lab == MASK_TUMOR, coarse, x0, y0, size * d, samples=16)
        annotated = tile_fractions(lab != 0, coarse, x0, y0, size * d, samples=16)
        return locs, tumor, annotated

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if getattr(self, "augment", None) is not None:
            self.augment.set_random_state(int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data=None) -> None:  # the draws happen in __getitem__
        pass

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def labels(self) -> np.ndarray:
        """Per tile: 1 for a tumor tile (tumor fraction >= ``tumor_fraction``, and some tumor), else 0."""
        return ((self.tumor >= self.tumor_threshold) & (self.tumor > 0)).astype(np.int64)

    def read_tile(self, index: int, y: int | None = None, x: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(image (T, T, 3) uint8, targets (T, T) int64)`` of tile ``index`` (or of that slide at ``(y, x)``)."""
        s, ty, tx = (int(v) for v in self.tiles[index])
        y, x = (ty if y is None else int(y)), (tx if x is None else int(x))
        entry, size = self.slides[s], self.tile_size
        geometry: TargetGeometry = entry["geometry"]
        view = SlideAtMpp(self.cache.get(entry["image"], entry["mpp"]), self.target_mpp)
        image = view.read(x, y, size, size)
        d = geometry.downsample
        label = entry["labels"].window((x, y), (size, size), d)
        tissue = entry["tissue"]
        tissue_px = sample_mask(tissue.mask, tissue.downsample, (size, size), d, (x, y), fill=False)
        rows, cols = geometry.shape
        valid = ((np.arange(size) + y < rows) & (np.arange(size) + y >= 0))[:, None] & \
            ((np.arange(size) + x < cols) & (np.arange(size) + x >= 0))[None, :]
        return image, tile_targets(label, tissue_px, self.exhaustive, valid)

    def __getitem__(self, index: int) -> dict:
        s, y, x = (int(v) for v in self.tiles[index])
        if self.jitter:
            rows, cols = self.slides[s]["geometry"].shape
            half, quarter = self.tile_size // 2, self.tile_size // 4
            y = int(np.clip(y + self.R.randint(-half, half + 1), -quarter, max(rows - self.tile_size + quarter,
                                                                              -quarter)))
            x = int(np.clip(x + self.R.randint(-half, half + 1), -quarter, max(cols - self.tile_size + quarter,
                                                                              -quarter)))
        image, target = self.read_tile(index, y, x)
        item = self.augment({"image": image, "label": target}) if self.augment is not None else \
            tile_tensors(image, target)
        item.update(slide_id=self.slides[s]["slide_id"], location=torch.tensor([y, x], dtype=torch.int64))
        return item


def tile_sampler(dataset: TileSegDataset, num_samples: int | None = None, balanced: bool = True,
                 seed: int = 0) -> Sampler:
    """Sampler of the training tiles: tumor and tumor-free tiles drawn equally often
    (:func:`~monai_wsi_ext.data.patches.balanced_sampler` on :attr:`TileSegDataset.labels`), or uniformly with
    ``balanced=False``; ``num_samples`` draws per epoch (default: the number of tiles), with replacement."""
    n = int(num_samples) if num_samples else len(dataset)
    if balanced:
        return balanced_sampler(dataset.labels, n, seed=seed)
    return RandomSampler(dataset, replacement=True, num_samples=n,
                         generator=torch.Generator().manual_seed(int(seed)))


class MaskedDiceCELoss(DiceCELoss):
    """MONAI's ``DiceCELoss`` whose targets may mark pixels to ignore (``ignore_index``, default -1): they count in
    neither the Dice nor the cross-entropy term. A batch without any counted pixel gives a zero loss (with a
    gradient of zeros) instead of NaN.

    Args:
        ignore_index: target value of ignored pixels (None: plain ``DiceCELoss``).
        kwargs: ``DiceCELoss`` arguments (``to_onehot_y``, ``softmax``, ``include_background``, ``batch``,
            ``lambda_dice``, ``lambda_ce``...).
    """

    def __init__(self, ignore_index: int | None = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        if ignore_index is not None:
            self.dice.ignore_index = int(ignore_index)
            ce = self.cross_entropy
            self.cross_entropy = torch.nn.CrossEntropyLoss(weight=ce.weight, reduction=ce.reduction,
                                                           label_smoothing=ce.label_smoothing,
                                                           ignore_index=int(ignore_index))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_index is not None and not bool((target != self.ignore_index).any()):
            return input.sum() * 0.0
        return super().forward(input, target)


def _pixel_counts(y_pred: torch.Tensor, y: torch.Tensor, ignore_index: int | None) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of the tumor class over the counted pixels of a batch (logits or probabilities)."""
    pred = y_pred.detach()
    if pred.ndim == 3:
        pred = pred[:, None]
    tumor = pred.argmax(dim=1) == 1 if pred.shape[1] > 1 else pred[:, 0] > 0.5
    target = y.detach()
    if target.ndim == tumor.ndim + 1:
        target = target[:, 0]
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    truth = (target == 1) & valid
    tumor = tumor & valid
    tp = int((tumor & truth).sum())
    fp = int((tumor & ~truth).sum())
    fn = int((~tumor & truth).sum())
    tn = int(valid.sum()) - tp - fp - fn
    return tp, fp, fn, tn


class _PixelMetric(Metric):
    def __init__(self, ignore_index: int | None = IGNORE_INDEX, output_transform=lambda x: x, device="cpu"):
        self.ignore_index = ignore_index
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(4, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output) -> None:
        y_pred, y = output[0], output[1]
        self._counts += torch.tensor(_pixel_counts(y_pred, y, self.ignore_index), dtype=torch.float64,
                                     device=self._device)

    @sync_all_reduce("_counts")
    def compute(self) -> float:
        tp, fp, fn, tn = (float(v) for v in self._counts)
        return self._value(tp, fp, fn, tn)

    def _value(self, tp: float, fp: float, fn: float, tn: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class PooledDice(_PixelMetric):
    """Pixel Dice of the tumor class ``2 TP / (2 TP + FP + FN)`` pooled over every pixel the metric sees (all
    validation tiles at once, so tumor-free tiles do not make it undefined; 1.0 when neither prediction nor truth
    has tumor). ``output`` is ``(logits (B, 2, H, W) or probabilities (B, 1, H, W), targets (B, 1, H, W))``;
    targets equal to ``ignore_index`` are left out."""

    def _value(self, tp, fp, fn, tn) -> float:
        return 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


class PixelAccuracy(_PixelMetric):
    """Fraction of the counted pixels whose tumor / not-tumor prediction is right (see :class:`PooledDice`)."""

    def _value(self, tp, fp, fn, tn) -> float:
        total = tp + fp + fn + tn
        return float("nan") if total == 0 else (tp + tn) / total
