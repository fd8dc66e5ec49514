"""The bundle's building blocks above single modules: slide encoding, per-slide feature files, canvas datasets,
slide-level evaluation and inference (slides -> heatmaps).

Configs name these by dotted path, e.g. ``"_target_": "monai_wsi_ext.workflows.FeatureExtractor"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.engines import Evaluator
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import Dataset

from monai_wsi_ext.canvas import (
    IGNORE_INDEX,
    canvas_forward,
    gather_from_canvas,
    label_canvas,
    plan_canvases,
    sample_window,
    scatter_to_canvas,
)
from monai_wsi_ext.data import SlidePatchSource, load_prepared_slides, make_patch_transform
from monai_wsi_ext.engines import freeze_batchnorm
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.grid import PatchLabel
from monai_wsi_ext.io_utils import atomic_path, write_json_atomic

__all__ = [
    "file_sha256",
    "encode_slide",
    "canvas_probabilities",
    "FeatureExtractor",
    "load_feature_file",
    "CanvasDataset",
    "labelled_cells",
    "E2ESlideDataset",
    "SlideEvaluator",
    "SlideInference",
    "prob_grid",
]

logger = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file (None for None or a missing file)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def encode_slide(encoder: torch.nn.Module, source: SlidePatchSource, batch_size: int = 64, device=None,
                 channels_last: bool = True, with_probs: bool = True, prefetch: int = 2
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode every patch of a slide: reading runs ahead in a thread while the encoder computes.

    Returns:
        ``(features (N, C) float32, tumor probabilities (N,) float32 from the encoder's head or None)``.
    """
    dev = _device(device) if device is not None else next(encoder.parameters()).device
    feats, probs = [], []
    mf = torch.channels_last if channels_last else torch.contiguous_format
    with freeze_batchnorm(encoder), torch.inference_mode():
        for _, batch in source.iter_batches(batch_size, prefetch=prefetch):
            x = batch.to(dev, non_blocking=True).contiguous(memory_format=mf)
            f = encoder.features(x)
            feats.append(f.float().cpu())
            if with_probs:
                head = getattr(encoder, "head", None)
                if head is not None:
                    probs.append(torch.softmax(head(f).float(), dim=1)[:, 1].cpu())
    c = getattr(encoder, "feature_dim", None) or (feats[0].shape[1] if feats else 0)
    f_all = torch.cat(feats).numpy() if feats else np.zeros((0, c), np.float32)
    p_all = (torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)) if with_probs else None
    return f_all.astype(np.float32), p_all


def canvas_probabilities(unet: torch.nn.Module, features, rows, cols, canvas_size: int, canvas_mode: str = "slide",
                         device=None, multiple: int = 16) -> np.ndarray:
    """Tumor probability of every patch from its features through the canvas U-Net (sliding window when the
    tissue is larger than ``canvas_size``, so no patch is cut)."""
    dev = _device(device) if device is not None else next(unet.parameters()).device
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=dev)
    rows_t, cols_t = torch.as_tensor(np.asarray(rows)).long(), torch.as_tensor(np.asarray(cols)).long()
    out = np.full(len(rows_t), np.nan, np.float32)
    if len(rows_t) == 0:
        return out
    with freeze_batchnorm(unet), torch.inference_mode():
        for lay in plan_canvases(rows_t, cols_t, canvas_size, mode=canvas_mode, multiple=multiple):
            idx = lay.indices.long()
            canvas = scatter_to_canvas(x[idx.to(dev)], lay.rows, lay.cols, lay.size, lay.offset)
            logits = canvas_forward(unet, canvas, canvas_size)
            p = torch.softmax(logits.float(), dim=0)
            out[idx.numpy()] = gather_from_canvas(p, lay.rows, lay.cols, lay.offset)[:, 1].cpu().numpy()
    return out


def prob_grid(values: np.ndarray, rows, cols, shape: tuple[int, int]) -> np.ndarray:
    """Per-patch values laid on the ``(rows, cols)`` grid, NaN where there is no patch."""
    grid = np.full(tuple(shape), np.nan, np.float32)
    grid[np.asarray(rows, np.int64), np.asarray(cols, np.int64)] = values
    return grid


def _encoder_key(checkpoint: str | None, encoder: torch.nn.Module, transform_desc: dict) -> str:
    """Identity of an encoder + transform: the checkpoint's hash, or (no checkpoint) a hash of the weights."""
    h = hashlib.sha256(json.dumps(transform_desc, sort_keys=True).encode())
    sha = file_sha256(checkpoint)
    if sha is not None:
        h.update(sha.encode())
    else:
        for k, v in encoder.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class FeatureExtractor:
    """Per-slide feature canvases on disk: ``<output_dir>/<slide_id>.npz`` with ``features`` (N, C), ``probs``
    (the encoder head's tumor probability per patch, the classifier-only baseline), ``rows``, ``cols``,
    ``labels``, ``grid_shape``, ``cell_size``, ``split`` and a ``cache_key``. A slide whose patch table, encoder
    checkpoint and transform are unchanged is not recomputed.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        output_dir: feature folder.
        encoder: a :class:`~monai_wsi_ext.networks.PatchEncoder` (weights already loaded, or see ``checkpoint``).
        checkpoint: encoder weights file to load (None: use ``encoder`` as is, e.g. random or frozen features).
        device: ``cpu``, ``cuda`` or ``auto``.
        splits: splits to extract (None: all).
        batch_size: patches per encoder call.
        crop_size: centre crop of the eval transform.
        stain_normalize: Macenko normalisation before encoding.
        backend: slide reader backend.
        channels_last: NHWC memory format (about 2x faster on CPU for GoogLeNet).
        overwrite: recompute every slide.
    """

    def __init__(self, prepared_dir: str, output_dir: str, encoder: torch.nn.Module, checkpoint: str | None = None,
                 device="auto", splits: Sequence[str] | None = None, batch_size: int = 64,
                 crop_size: int | None = 224, stain_normalize: bool = False, backend: str = "auto",
                 channels_last: bool = True, overwrite: bool = False, num_workers: int = 2):
        self.prepared_dir, self.output_dir = Path(prepared_dir), Path(output_dir)
        self.device = _device(device)
        self.encoder = encoder
        self.checkpoint = checkpoint
        self.splits = splits
        self.batch_size, self.crop_size, self.stain_normalize = batch_size, crop_size, stain_normalize
        self.backend, self.channels_last, self.overwrite, self.num_workers = backend, channels_last, overwrite, \
            num_workers

    def _load(self) -> str:
        if self.checkpoint:
            from monai_wsi_ext.networks import load_encoder_checkpoint

            load_encoder_checkpoint(self.encoder, self.checkpoint)
        self.encoder.to(self.device)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        return _encoder_key(self.checkpoint, self.encoder, {"crop": self.crop_size, "stain": self.stain_normalize})

    def run(self) -> dict:
        key = self._load()
        slides = load_prepared_slides(self.prepared_dir, self.splits)
        if not slides:
            raise MonaiWsiExtError(f"{self.prepared_dir}: no prepared slides (run scripts/prepare_dataset.py first)")
        transform = make_patch_transform(False, self.crop_size, self.stain_normalize)
        done, skipped, failed = [], [], {}
        for meta in slides:
            sid = meta["slide_id"]
            out = self.output_dir / f"{sid}.npz"
            table_sha = file_sha256(Path(meta["dir"]) / "patches.csv")
            cache_key = hashlib.sha256(f"{key}:{table_sha}".encode()).hexdigest()
            if out.exists() and not self.overwrite:
                try:
                    with np.load(out) as old:
                        if str(old["cache_key"]) == cache_key:
                            skipped.append(sid)
                            continue
                except Exception:  # noqa: BLE001 - an unreadable cache file is recomputed
                    pass
            try:
                t0 = time.perf_counter()
                grid = meta["grid"]
                source = SlidePatchSource.from_prepared(meta, transform, self.backend, self.num_workers)
                feats, probs = encode_slide(self.encoder, source, self.batch_size, self.device, self.channels_last)
                source.close()
                with atomic_path(out) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, features=feats, probs=probs, rows=grid.rows, cols=grid.cols, labels=grid.labels,
                                 grid_shape=np.asarray(grid.shape), cell_size=np.float64(grid.cell_size),
                                 split=np.str_(meta.get("split", "")), slide_id=np.str_(sid),
                                 image=np.str_(meta["image"]), mpp=np.float64(meta["mpp"] or np.nan),
                                 dimensions=np.asarray(meta["dimensions"]), cache_key=np.str_(cache_key))
                logger.info("%s: %d patches encoded in %.1f s", sid, len(grid), time.perf_counter() - t0)
                done.append(sid)
            except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
                failed[sid] = f"{type(e).__name__}: {e}"
                logger.error("%s: feature extraction failed, skipped (%s)", sid, e)
        summary = {"done": done, "skipped": skipped, "failed": failed, "output_dir": str(self.output_dir)}
        write_json_atomic(self.output_dir / "features_summary.json", summary)
        logger.info("features: %d computed, %d unchanged, %d failed", len(done), len(skipped), len(failed))
        if failed:
            raise MonaiWsiExtError(f"feature extraction failed for {sorted(failed)}: {failed}")
        return summary


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


def _split_set(split) -> set[str] | None:
    if split is None:
        return None
    return {split} if isinstance(split, str) else set(split)


class CanvasDataset(Dataset):
    """Feature canvases and label canvases of the slides in a feature folder.

    Training (``train=True``) yields ``canvas_size`` canvases: the centred canvas when the tissue fits, else a
    random window (anchored on a labelled patch), plus random rotations by 90° and flips of canvas and labels
    together. Evaluation yields each layout whole (larger than ``canvas_size`` when the tissue is), for a
    ``SlidingWindowInferer`` with ``roi_size=canvas_size``; use ``batch_size=1`` then.

    Items: ``image`` (C, H, W) float, ``label`` (H, W) long with ``IGNORE_INDEX`` for nolabel and background.
    """

    def __init__(self, feature_dir: str, split: str | Sequence[str] | None = None, canvas_size: int = 512,
                 canvas_mode: str = "slide", train: bool = True, augment: bool = True, multiple: int = 16,
                 seed: int = 0, slide_ids: Sequence[str] | None = None):
        splits = _split_set(split)
        self.canvas_size, self.train, self.augment = int(canvas_size), train, augment
        self.generator = torch.Generator().manual_seed(int(seed))
        self.items = []
        for path in sorted(Path(feature_dir).glob("*.npz")):
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
        canvas = scatter_to_canvas(item["features"][idx], lay.rows, lay.cols, lay.size, lay.offset)
        target = label_canvas(item["labels"][idx], lay.rows, lay.cols, lay.size, lay.offset)
        if self.train and self.augment:
            k = int(torch.randint(0, 4, (1,), generator=self.generator))
            canvas, target = torch.rot90(canvas, k, (1, 2)), torch.rot90(target, k, (0, 1))
            if bool(torch.rand(1, generator=self.generator) < 0.5):
                canvas, target = torch.flip(canvas, (2,)), torch.flip(target, (1,))
        return {Keys.IMAGE: canvas.contiguous(), Keys.LABEL: target.contiguous(), "slide_id": item["slide_id"]}


def tumor_probability(data: dict) -> dict:
    """Post-transform for patch classifiers: ``pred`` logits (B, 2) -> class-1 probabilities (B,)."""
    d = dict(data)
    d[Keys.PRED] = torch.softmax(d[Keys.PRED].float(), dim=1)[:, 1].detach()
    return d


def labelled_cells(data: dict) -> dict:
    """Post-transform for canvas evaluators: turn ``pred`` logits (B, K, H, W) and ``label`` (B, H, W) into the
    class-1 probabilities and labels of the labelled cells only (``pred`` (n,), ``label`` (n,)), i.e. patch-level
    values gathered back from the canvas, for accuracy and PR-AUC."""
    d = dict(data)
    pred, label = d[Keys.PRED], d[Keys.LABEL]
    if pred.ndim == 3:
        pred, label = pred[None], label[None]
    prob = torch.softmax(pred.float(), dim=1)[:, 1]
    lab = label[:, 0] if label.ndim == 4 else label
    if lab.ndim == 2:
        lab = lab[None]
    keep = lab != IGNORE_INDEX
    d[Keys.PRED], d[Keys.LABEL] = prob[keep].detach(), lab[keep].long()
    return d


class E2ESlideDataset(Dataset):
    """Slides for :class:`~monai_wsi_ext.engines.SurrogateE2ETrainer`: each item holds a patch source that
    re-reads the slide's patches on demand with replayable training augmentation, and the grid rows/cols/labels.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        split: split(s) to use.
        crop_size: random crop of the augmentation.
        augment: the paper's augmentation (replayed from per-patch seeds) or the eval transform.
        stain_normalize: Macenko normalisation.
        backend: slide reader backend.
    """

    def __init__(self, prepared_dir: str, split: str | Sequence[str] | None = "training", crop_size: int | None = 224,
                 augment: bool = True, stain_normalize: bool = False, backend: str = "auto", num_workers: int = 2):
        self.slides = [m for m in load_prepared_slides(prepared_dir, split) if len(m["grid"]) > 0]
        if not self.slides:
            raise MonaiWsiExtError(f"{prepared_dir}: no prepared slides with patches for split {split!r}")
        self.crop_size, self.augment, self.stain_normalize = crop_size, augment, stain_normalize
        self.backend, self.num_workers = backend, num_workers

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        meta = self.slides[index]
        grid = meta["grid"]
        transform = make_patch_transform(self.augment, self.crop_size, self.stain_normalize)
        return {"patch_source": SlidePatchSource.from_prepared(meta, transform, self.backend, self.num_workers),
                "rows": torch.from_numpy(grid.rows), "cols": torch.from_numpy(grid.cols),
                "labels": torch.from_numpy(grid.labels), "slide_id": meta["slide_id"]}


class SlideEvaluator(Evaluator):
    """Validation of encoder + canvas U-Net together, one slide per iteration: the current encoder encodes every
    patch, the U-Net runs over the whole grid (sliding window when larger than ``canvas_size``), and the output
    holds the labelled patches' tumor probabilities (``pred``) and labels (``label``) for patch-level metrics.

    Args:
        device: compute device.
        val_data_loader: loader over :class:`E2ESlideDataset` items (``augment=False``), ``batch_size=1``,
            ``collate_fn=slide_collate``.
        encoder: patch encoder.
        unet: canvas U-Net.
        canvas_size: the U-Net's canvas size.
        canvas_mode: ``slide`` or ``lumps``.
        batch_size: patches per encoder call.
        kwargs: passed to MONAI's ``Evaluator`` (key_val_metric, val_handlers, ...).
    """

    def __init__(self, device, val_data_loader, encoder, unet, canvas_size: int = 512, canvas_mode: str = "slide",
                 batch_size: int = 64, **kwargs):
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, **kwargs)
        self.encoder, self.unet = encoder, unet
        self.canvas_size, self.canvas_mode, self.batch_size = canvas_size, canvas_mode, batch_size

    def _iteration(self, engine, batchdata):
        item = batchdata[0] if isinstance(batchdata, (list, tuple)) else batchdata
        source = item["patch_source"]
        feats, _ = encode_slide(self.encoder, source, self.batch_size, engine.state.device, channels_last=False,
                                with_probs=False)
        probs = canvas_probabilities(self.unet, feats, item["rows"], item["cols"], self.canvas_size,
                                     self.canvas_mode, engine.state.device)
        labels = item["labels"].numpy()
        keep = labels != PatchLabel.NOLABEL
        return {Keys.PRED: torch.from_numpy(probs[keep]), Keys.LABEL: torch.from_numpy(labels[keep])}


class SlideInference:
    """Slides -> tumor heatmaps: tissue and patch grid (prepared on the fly unless a prepared folder is given),
    patch features streamed through the encoder with reading overlapped, the canvas U-Net over the whole grid,
    then per slide ``.npy``/PNG maps, an aligned pyramidal TIFF, an overlay, a QuPath GeoJSON of tumor regions,
    a slide score and a run record (:func:`monai_wsi_ext.writers.write_slide_outputs`).

    A slide that fails is reported in ``inference_summary.json`` and the others go on; ``run`` raises at the end
    when any failed, so ``python -m monai.bundle run`` exits non-zero.

    Args:
        slides: a folder of slides, a slide file, a list, or None with ``manifest``/``prepared_dir``.
        output_dir: where heatmaps go (one folder per slide).
        encoder: patch encoder.
        unet: canvas U-Net (None: ``mode="classifier"``).
        encoder_checkpoint: encoder weights file.
        unet_checkpoint: U-Net weights file.
        manifest: a dataset manifest (its slides are used; ``split`` filters).
        prepared_dir: an existing ``prepare_dataset`` output to reuse.
        split: split filter for manifests/prepared folders.
        prepare: :class:`~monai_wsi_ext.prepare.PrepareConfig` keyword arguments (patch size, level, ...).
        canvas_size: the U-Net's canvas size.
        canvas_mode: ``slide`` or ``lumps``.
        mode: ``canvas`` (encoder + U-Net) or ``classifier`` (the encoder head's probabilities straight onto the
            map: the classifier-only baseline).
        threshold: tumor threshold of the GeoJSON regions.
        device: ``cpu``, ``cuda`` or ``auto``.
        batch_size: patches per encoder call.
        crop_size: eval centre crop.
        backend: slide reader backend.
        weight_files: name -> file of the weights in use, for the checksums of the run record, when the networks
            come loaded (e.g. TorchScript files) rather than from ``encoder_checkpoint``/``unet_checkpoint``.
        itk_format: also write the map as an ITK image with physical spacing (``nrrd`` or ``mha``; needs
            the ``itk`` extra), see :func:`monai_wsi_ext.writers.write_prob_itk`.
    """

    def __init__(self, output_dir: str, encoder: torch.nn.Module, unet: torch.nn.Module | None = None,
                 encoder_checkpoint: str | None = None, unet_checkpoint: str | None = None, slides=None,
                 manifest: str | None = None, prepared_dir: str | None = None, split: str | Sequence[str] | None = None,
                 prepare: dict | None = None, canvas_size: int = 512, canvas_mode: str = "slide",
                 mode: str = "canvas", threshold: float = 0.5, device="auto", batch_size: int = 64,
                 crop_size: int | None = 224, backend: str = "auto", channels_last: bool = True,
                 stain_normalize: bool = False, config: dict | None = None, weight_files: dict | None = None,
                 itk_format: str | None = None):
        if mode not in ("canvas", "classifier"):
            raise ValueError(f"`mode` must be 'canvas' or 'classifier', got {mode!r}.")
        if mode == "canvas" and unet is None:
            raise ValueError("`mode='canvas'` needs a `unet`.")
        self.output_dir = Path(output_dir)
        self.encoder, self.unet = encoder, unet
        self.encoder_checkpoint, self.unet_checkpoint = encoder_checkpoint, unet_checkpoint
        self.slides, self.manifest, self.prepared_dir, self.split = slides, manifest, prepared_dir, split
        self.prepare_kwargs = dict(prepare or {})
        self.canvas_size, self.canvas_mode, self.mode, self.threshold = canvas_size, canvas_mode, mode, threshold
        self.device = _device(device)
        self.batch_size, self.crop_size, self.backend = batch_size, crop_size, backend
        self.channels_last, self.stain_normalize = channels_last, stain_normalize
        self.config = config
        self.weight_files = dict(weight_files or {})
        self.itk_format = itk_format or None
        if self.itk_format is not None:  # fail before any slide rather than on every slide
            from monai_wsi_ext.writers import ITK_FORMATS

            if self.itk_format not in ITK_FORMATS:
                raise ConfigError(f"`itk_format` must be one of {ITK_FORMATS} or None, got {itk_format!r}.")
            if importlib.util.find_spec("itk") is None:
                raise ConfigError("`itk_format` needs the `itk` extra: pip install -e \".[itk]\"")

    def _load_networks(self) -> None:
        from monai_wsi_ext.networks import load_encoder_checkpoint, read_state_dict

        if self.encoder_checkpoint:
            load_encoder_checkpoint(self.encoder, self.encoder_checkpoint)
        self.encoder.to(self.device).eval()
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        if self.unet is not None:
            if self.unet_checkpoint:
                self.unet.load_state_dict(read_state_dict(self.unet_checkpoint))
            self.unet.to(self.device).eval()

    def _prepared(self) -> list[dict]:
        if self.prepared_dir is not None and self.slides is None and self.manifest is None:
            return load_prepared_slides(self.prepared_dir, self.split)
        from monai_wsi_ext.prepare import PrepareConfig, collect_inputs, prepare_dataset

        inputs = collect_inputs(slides=self.slides, manifest=self.manifest)
        splits = _split_set(self.split)
        if splits is not None and self.manifest is not None:
            inputs = [i for i in inputs if i.split in splits]
        prepared_dir = self.output_dir / "prepared"
        summary = prepare_dataset(inputs, prepared_dir, PrepareConfig(**self.prepare_kwargs), progress=False)
        self._prepare_failed = summary["failed"]
        ids = {i.slide_id for i in inputs}
        return [m for m in load_prepared_slides(prepared_dir) if m["slide_id"] in ids]

    def run(self) -> dict:
        from monai_wsi_ext.writers import write_slide_outputs

        self._prepare_failed = {}
        self._load_networks()
        slides = self._prepared()
        transform = make_patch_transform(False, self.crop_size, self.stain_normalize)
        weights = {k: v for k, v in (("encoder", self.encoder_checkpoint), ("unet", self.unet_checkpoint)) if v}
        weights.update(self.weight_files)
        results, failed = {}, dict(self._prepare_failed)
        for meta in slides:
            sid = meta["slide_id"]
            try:
                t0 = time.perf_counter()
                grid = meta["grid"]
                source = SlidePatchSource.from_prepared(meta, transform, self.backend)
                feats, head_probs = encode_slide(self.encoder, source, self.batch_size, self.device,
                                                 self.channels_last)
                if self.mode == "canvas":
                    probs = canvas_probabilities(self.unet, feats, grid.rows, grid.cols, self.canvas_size,
                                                 self.canvas_mode, self.device)
                else:
                    probs = head_probs
                pgrid = prob_grid(probs, grid.rows, grid.cols, grid.shape)
                thumb, thumb_ds = source.slide.thumbnail(max_size=2048)
                source.close()
                out = write_slide_outputs(self.output_dir / sid, sid, pgrid, grid.cell_size,
                                          tuple(meta["dimensions"]), meta.get("mpp"), thumb, thumb_ds,
                                          threshold=self.threshold, config=self.config, weights=weights,
                                          itk_format=self.itk_format)
                np.save(self.output_dir / sid / f"{sid}_labels.npy", grid.label_grid())
                results[sid] = {"slide_score": out["slide_score"], "n_regions": out.get("n_regions"),
                                "n_patches": len(grid), "seconds": round(time.perf_counter() - t0, 2),
                                "dir": str(self.output_dir / sid)}
                logger.info("%s: %d patches, slide score %.3f, %.1f s -> %s", sid, len(grid), out["slide_score"],
                            results[sid]["seconds"], self.output_dir / sid)
            except (MonaiWsiExtError, OSError, RuntimeError, ValueError) as e:
                failed[sid] = f"{type(e).__name__}: {e}"
                logger.error("%s: inference failed, skipped (%s)", sid, e)
        summary = {"mode": self.mode, "slides": results, "failed": failed, "output_dir": str(self.output_dir)}
        write_json_atomic(self.output_dir / "inference_summary.json", summary)
        if failed:
            raise MonaiWsiExtError(f"inference failed for {len(failed)} slide(s): {failed}")
        return summary
