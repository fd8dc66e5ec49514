"""Slide inference: slides -> tissue, patch grid, features, canvas U-Net -> heatmaps and records."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_wsi_ext.data.patches import SlidePatchSource, load_prepared_slides, make_patch_transform
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import write_json_atomic
from monai_wsi_ext.model.predict import canvas_probabilities, encode_slide, prob_grid
from monai_wsi_ext.utils import resolve_device, split_set

__all__ = ["SlideInference"]

logger = logging.getLogger(__name__)


class SlideInference:
    """Slides -> tumor heatmaps: tissue and patch grid (prepared on the fly unless a prepared folder is given),
    patch features streamed through the encoder with reading overlapped, the canvas U-Net over the whole grid,
    then per slide ``.npy``/PNG maps, an aligned pyramidal TIFF, an overlay, a QuPath GeoJSON of tumor regions,
    a slide score and a run record (:func:`monai_wsi_ext.outputs.writers.write_slide_outputs`).

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
        prepare: :class:`~monai_wsi_ext.prep.prepare.PrepareConfig` keyword arguments (patch size, level, ...).
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
            the ``itk`` extra), see :func:`monai_wsi_ext.outputs.writers.write_prob_itk`.
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
        self.device = resolve_device(device)
        self.batch_size, self.crop_size, self.backend = batch_size, crop_size, backend
        self.channels_last, self.stain_normalize = channels_last, stain_normalize
        self.config = config
        self.weight_files = dict(weight_files or {})
        self.itk_format = itk_format or None
        if self.itk_format is not None:  # fail before any slide rather than on every slide
            from monai_wsi_ext.outputs.writers import ITK_FORMATS

            if self.itk_format not in ITK_FORMATS:
                raise ConfigError(f"`itk_format` must be one of {ITK_FORMATS} or None, got {itk_format!r}.")
            if importlib.util.find_spec("itk") is None:
                raise ConfigError("`itk_format` needs the `itk` extra: pip install -e \".[itk]\"")

    def _load_networks(self) -> None:
        from monai_wsi_ext.model.networks import load_checkpoint

        if self.encoder_checkpoint:
            load_checkpoint(self.encoder, self.encoder_checkpoint, option="encoder_ckpt")
        self.encoder.to(self.device).eval()
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        if self.unet is not None:
            if self.unet_checkpoint:
                load_checkpoint(self.unet, self.unet_checkpoint, option="unet_ckpt")
            self.unet.to(self.device).eval()

    def _prepared(self) -> list[dict]:
        if self.prepared_dir is not None and self.slides is None and self.manifest is None:
            return load_prepared_slides(self.prepared_dir, self.split)
        from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset

        inputs = collect_inputs(slides=self.slides, manifest=self.manifest)
        splits = split_set(self.split)
        if splits is not None and self.manifest is not None:
            inputs = [i for i in inputs if i.split in splits]
        prepared_dir = self.output_dir / "prepared"
        summary = prepare_dataset(inputs, prepared_dir, PrepareConfig(**self.prepare_kwargs), progress=False)
        self._prepare_failed = summary["failed"]
        ids = {i.slide_id for i in inputs}
        return [m for m in load_prepared_slides(prepared_dir) if m["slide_id"] in ids]

    def run(self) -> dict:
        from monai_wsi_ext.outputs.writers import write_slide_outputs

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
