"""Whole-slide inference by overlapping sliding windows at the target resolution, blended into one probability mask.

MONAI's ``PatchInferer`` runs the U-Net over the tiles that :class:`SlideTileSplitter` reads (through the project's
reader, :class:`~monai_wsi_ext.tileseg.tiles.SlideAtMpp`: only the tiles, never the full-resolution slide; tiles
without tissue are skipped) and :class:`BlendMerger` adds each tile's output into the whole-slide mask with a
gaussian (default) or constant weight map and divides by the summed weights, so overlapping tiles blend and the
seams of tile borders disappear. The splitter pads the last row and column of tiles past the slide (white) and the
merger crops the result back to the slide's target-resolution shape. A model that returns its input gives back the
slide image exactly (the identity round trip of the tests), borders included.

:class:`TileSegInferer` is the slide inferer of ``infer_tile_seg.json``'s
:class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator`: ``inferer(item, network)`` takes a slide item (its
``prepared`` slide) and returns the tumor probability mask at the target resolution (NaN where no tile was
inferred).

Memory: the merger holds two float32 arrays of the target-resolution size (8 bytes per target pixel: a
100k x 200k px slide at 0.25 µm/px is 2.5 GB at 2 µm/px, 10 GB at 1 µm/px); the tiles are read and released as
they go.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.data.utils import compute_importance_map, iter_patch_position
from monai.inferers import PatchInferer
from monai.inferers.merger import Merger
from monai.inferers.splitter import SlidingWindowSplitter

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.predict import eval_mode
from monai_wsi_ext.prep.tissue import TissueMask
from monai_wsi_ext.tileseg.masks import tile_fractions
from monai_wsi_ext.tileseg.tiles import SlideAtMpp, prepared_tissue
from monai_wsi_ext.utils import module_device

__all__ = ["BLEND_MODES", "SlideTileSplitter", "BlendMerger", "tumor_probability_map", "TileSegInferer"]

logger = logging.getLogger(__name__)

#: weight maps of :class:`BlendMerger`
BLEND_MODES = ("gaussian", "constant")


class SlideTileSplitter(SlidingWindowSplitter):
    """Overlapping square tiles of a slide at the target resolution, read through the project's reader.

    The input is a :class:`~monai_wsi_ext.tileseg.tiles.SlideAtMpp`. Tile positions are MONAI's sliding-window
    positions (:class:`~monai.inferers.SlidingWindowSplitter`: stride ``patch_size - overlap``, the slide padded at
    its end so that the last tiles fit); tiles with less than ``min_tissue`` tissue (none, by default: any tissue
    keeps a tile) are not read. Tiles are read in batches (:meth:`~monai_wsi_ext.tileseg.tiles.SlideAtMpp.read_tiles`)
    and, with ``prefetch``, the next batch is read in a background thread while the network runs on the current one
    (a read error still stops the slide). Each tile is yielded as a float32 ``(1, 3, T, T)`` tensor in [0, 1]
    with its target-pixel ``(y, x)``.

    Args:
        patch_size: tile side in target pixels.
        overlap: relative (float in [0, 1)) or absolute (int pixels) overlap of neighbouring tiles.
        tissue: the slide's tissue mask (None: every tile is read).
        min_tissue: smallest tissue fraction of a read tile (on ``tissue_samples`` x ``tissue_samples`` points).
        tissue_samples: sample points per tile side for the tissue fraction.
        read_batch: tiles per batched read.
        prefetch: read the next batch while the current one is inferred.
        device: device of the yielded tiles (None: CPU).

    Attributes:
        n_tiles: tiles yielded by the last call; ``n_positions`` all positions before the tissue filter.
    """

    def __init__(self, patch_size: int = 512, overlap: float | int = 0.25, tissue: TissueMask | None = None,
                 min_tissue: float = 0.0, tissue_samples: int = 16, read_batch: int = 16, prefetch: bool = True,
                 device: torch.device | str | None = None):
        super().__init__(patch_size=int(patch_size), overlap=overlap, offset=0, filter_fn=None, pad_mode="constant",
                         pad_value=1.0, device=device)
        if not 0.0 <= float(min_tissue) <= 1.0:
            raise ConfigError(f"`min_tissue` must be in [0, 1], got {min_tissue!r}.")
        self.tissue, self.min_tissue, self.tissue_samples = tissue, float(min_tissue), int(tissue_samples)
        self.read_batch, self.prefetch = max(int(read_batch), 1), bool(prefetch)
        self.n_tiles = self.n_positions = 0

    def get_input_shape(self, inputs: SlideAtMpp) -> tuple:
        """``(rows, cols)`` of the slide at the target resolution."""
        return tuple(int(s) for s in inputs.shape)

    def locations(self, inputs: SlideAtMpp) -> np.ndarray:
        """``(N, 2)`` target-pixel ``(y, x)`` of the tiles to read (after the tissue filter)."""
        spatial = self.get_input_shape(inputs)
        patch_size, overlap, offset = self._get_valid_shape_parameters(spatial)
        padded = self.get_padded_shape(inputs)
        locs = np.array(list(iter_patch_position(padded, patch_size, offset, overlap, False)), np.int64).reshape(-1, 2)
        self.n_positions = len(locs)
        if self.tissue is not None and len(locs):
            d, size = inputs.downsample, patch_size[0]
            frac = tile_fractions(self.tissue.mask, self.tissue.downsample, locs[:, 1] * d, locs[:, 0] * d,
                                  size * d, samples=self.tissue_samples)
            locs = locs[frac >= max(self.min_tissue, 1e-9)]
        return locs

    def __call__(self, inputs: SlideAtMpp) -> Iterator[tuple[torch.Tensor, Sequence[int]]]:
        if not isinstance(inputs, SlideAtMpp):
            raise ValueError(f"SlideTileSplitter reads a SlideAtMpp, got {type(inputs).__name__}.")
        size = self._get_valid_shape_parameters(self.get_input_shape(inputs))[0][0]
        locs = self.locations(inputs)
        self.n_tiles = 0
        chunks = [locs[i:i + self.read_batch] for i in range(0, len(locs), self.read_batch)]

        def read(chunk: np.ndarray) -> list[np.ndarray]:
            return list(inputs.read_tiles(chunk, size, batch_size=len(chunk)))

        def tensor(tile: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1))).float().div_(255.0)[None]
            return t.to(self.device) if self.device is not None else t

        if not self.prefetch or len(chunks) < 2:
            for chunk in chunks:
                for loc, tile in zip(chunk, read(chunk)):
                    self.n_tiles += 1
                    yield tensor(tile), (int(loc[0]), int(loc[1]))
            return
        # the reading thread runs in a copy of this context, so the per-slide time limit (slide_timeout) holds there
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(contextvars.copy_context().run, read, chunks[0])
            for i, chunk in enumerate(chunks):
                tiles = future.result()  # re-raises a read error of that batch
                if i + 1 < len(chunks):
                    future = pool.submit(contextvars.copy_context().run, read, chunks[i + 1])
                for loc, tile in zip(chunk, tiles):
                    self.n_tiles += 1
                    yield tensor(tile), (int(loc[0]), int(loc[1]))


class BlendMerger(Merger):
    """Weighted average of overlapping tile outputs: each tile adds ``output * w`` and ``w`` (a gaussian or constant
    weight map of the tile's size, MONAI's ``compute_importance_map``), ``finalize`` divides the two, NaN where no
    tile reached. With the gaussian map a pixel's value comes mostly from the tiles whose centre is near it, where
    the network saw the most context.

    Args:
        merged_shape: ``(B, C, H, W)`` of the padded output.
        cropped_shape: shape of the final output (the unpadded slide).
        mode: ``gaussian`` or ``constant`` (plain mean, as MONAI's ``AvgMerger``).
        sigma_scale: gaussian sigma relative to the tile side.
        device: device of the accumulators.
    """

    def __init__(self, merged_shape: Sequence[int], cropped_shape: Sequence[int] | None = None,
                 mode: str = "gaussian", sigma_scale: float = 0.125, device: torch.device | str = "cpu"):
        super().__init__(merged_shape=merged_shape, cropped_shape=cropped_shape, device=device)
        if mode not in BLEND_MODES:
            raise ConfigError(f"`blend` must be one of {BLEND_MODES}, got {mode!r}.")
        self.mode, self.sigma_scale = mode, float(sigma_scale)
        self.values = torch.zeros(tuple(self.merged_shape), dtype=torch.float32, device=self.device)
        self.weights = torch.zeros(tuple(self.merged_shape[2:]), dtype=torch.float32, device=self.device)
        self._maps: dict[tuple[int, ...], torch.Tensor] = {}

    def _map(self, size: tuple[int, ...]) -> torch.Tensor:
        if size not in self._maps:
            self._maps[size] = compute_importance_map(size, mode=self.mode, sigma_scale=self.sigma_scale,
                                                      device=self.device, dtype=torch.float32)
        return self._maps[size]

    def aggregate(self, values: torch.Tensor, location: Sequence[int]) -> None:
        if self.is_finalized:
            raise ValueError("BlendMerger is already finalized.")
        size = tuple(int(s) for s in values.shape[2:])
        w = self._map(size)
        where = tuple(slice(int(loc), int(loc) + s) for loc, s in zip(location, size))
        self.values[(slice(None), slice(None), *where)] += values.to(self.values) * w
        self.weights[where] += w

    def finalize(self) -> torch.Tensor:
        if not self.is_finalized:
            covered = self.weights > 0
            self.values = torch.where(covered, self.values / torch.where(covered, self.weights, 1.0),
                                      torch.full_like(self.values, float("nan")))
            self.values = self.values[tuple(slice(0, end) for end in self.cropped_shape)]
            self.is_finalized = True
        return self.values


def tumor_probability_map(logits: torch.Tensor) -> torch.Tensor:
    """The tumor probability of a batch of segmentation outputs, on the CPU: softmax channel 1 of ``(B, K, H, W)``
    logits (K >= 2), or the sigmoid of a one-channel output; ``(B, 1, H, W)`` float32."""
    logits = logits.float()
    prob = torch.softmax(logits, dim=1)[:, 1:2] if logits.shape[1] > 1 else torch.sigmoid(logits)
    return prob.cpu()


class TileSegInferer:
    """Tile segmentation of one slide at the target resolution, for the slide evaluator (``infer_tile_seg.json``).

    ``inferer(item, network)`` takes a slide item with ``prepared`` (a
    :class:`~monai_wsi_ext.prep.prepare.PreparedSlide`; its slide is opened once and left open for the writer's
    thumbnail, the evaluator closes it), reads it at ``target_mpp`` (:class:`~monai_wsi_ext.tileseg.tiles.SlideAtMpp`),
    runs MONAI's ``PatchInferer`` with :class:`SlideTileSplitter` (tissue tiles of the prepared tissue mask) and
    :class:`BlendMerger`, and returns ``{"pixel_prob": (H, W) float32 tumor probability, NaN where no tile was
    inferred, "downsample", "target_mpp", "tiles", "positions", "seconds"}``.

    Args:
        target_mpp: µm/px, as in training.
        tile_size: tile side in target pixels, as in training.
        overlap: overlap of neighbouring tiles (fraction of the tile, or pixels).
        blend: ``gaussian`` or ``constant`` weights (:class:`BlendMerger`).
        sigma_scale: gaussian sigma relative to the tile side.
        batch_size: tiles per forward pass.
        min_tissue: smallest tissue fraction of an inferred tile (0: any tissue).
        read_batch: tiles per batched read.
        prefetch: read the next tiles while the network runs.
        backend: slide reader backend (when the slide is not open yet).
        num_workers: decoder threads of the batched reads.
    """

    def __init__(self, target_mpp: float = 1.0, tile_size: int = 512, overlap: float | int = 0.25,
                 blend: str = "gaussian", sigma_scale: float = 0.125, batch_size: int = 8, min_tissue: float = 0.0,
                 read_batch: int = 16, prefetch: bool = True, backend: str = "auto", num_workers: int = 2):
        if blend not in BLEND_MODES:
            raise ConfigError(f"`blend` must be one of {BLEND_MODES}, got {blend!r}.")
        self.target_mpp, self.tile_size, self.overlap = float(target_mpp), int(tile_size), overlap
        self.blend, self.sigma_scale, self.batch_size = blend, float(sigma_scale), max(int(batch_size), 1)
        self.min_tissue, self.read_batch, self.prefetch = float(min_tissue), int(read_batch), bool(prefetch)
        self.backend, self.num_workers = backend, int(num_workers)
        SlideTileSplitter(self.tile_size, overlap, min_tissue=self.min_tissue)  # bad settings fail at construction

    def splitter(self, tissue: TissueMask | None = None) -> SlideTileSplitter:
        """The splitter of one slide."""
        return SlideTileSplitter(self.tile_size, self.overlap, tissue=tissue, min_tissue=self.min_tissue,
                                 read_batch=self.read_batch, prefetch=self.prefetch)

    def predict(self, view: SlideAtMpp, network: Callable, tissue: TissueMask | None = None,
                output: Callable[[torch.Tensor], torch.Tensor] | None = tumor_probability_map
                ) -> tuple[np.ndarray, SlideTileSplitter]:
        """Infer every (tissue) tile of ``view`` and blend the outputs.

        Args:
            view: the slide at the target resolution.
            network: the segmentation network (a callable on ``(B, 3, T, T)`` tensors in [0, 1]).
            tissue: the slide's tissue mask (None: every tile).
            output: turns the network output into what is merged (default: the tumor probability; None merges the
                raw output, e.g. for a model that returns its input).

        Returns:
            ``(merged, splitter)``: ``merged`` is ``(C, H, W)`` float32 at the target resolution (NaN where no tile
            was inferred; ``(1, H, W)`` for the tumor probability), ``splitter`` says how many tiles were read.
        """
        splitter = self.splitter(tissue)
        device = module_device(network)[0] if isinstance(network, torch.nn.Module) else torch.device("cpu")
        inferer = PatchInferer(splitter=splitter, merger_cls=BlendMerger, batch_size=self.batch_size,
                               preprocessing=lambda t: t.to(device), postprocessing=_cpu(output),
                               mode=self.blend, sigma_scale=self.sigma_scale, device="cpu")
        if isinstance(network, torch.nn.Module):
            with eval_mode(network), torch.inference_mode():
                merged = inferer(view, network)
        else:
            with torch.inference_mode():
                merged = inferer(view, network)
        if isinstance(merged, (list, tuple)) and len(merged) == 0:  # no tile (no tissue): nothing inferred
            rows, cols = view.shape
            return np.full((1, rows, cols), np.nan, np.float32), splitter
        return merged[0].numpy().astype(np.float32, copy=False), splitter

    def __call__(self, inputs: dict, network: torch.nn.Module | None = None) -> dict[str, Any]:
        if network is None:
            raise ValueError("the tile segmentation inferer needs the segmentation network as `network`.")
        t0 = time.perf_counter()
        prepared = inputs["prepared"]
        view = SlideAtMpp(prepared.open(self.backend), self.target_mpp, num_workers=self.num_workers)
        tissue = prepared_tissue(prepared, self.backend)
        merged, splitter = self.predict(view, network, tissue)
        seconds = time.perf_counter() - t0
        logger.info("%s: %d of %d tile(s) of %d px at %g µm/px inferred in %.1f s", prepared.slide_id,
                    splitter.n_tiles, splitter.n_positions, self.tile_size, self.target_mpp, seconds)
        return {"pixel_prob": merged[0], "downsample": view.downsample, "target_mpp": self.target_mpp,
                "tiles": splitter.n_tiles, "positions": splitter.n_positions, "seconds": round(seconds, 2)}


def _cpu(output: Callable | None) -> Callable:
    def post(out: torch.Tensor) -> torch.Tensor:
        out = output(out) if output is not None else out
        return out.detach().float().cpu()

    return post
