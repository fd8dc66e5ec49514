"""Feature extraction: every prepared slide's patches through the encoder into a feature file."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform

from monai_wsi_ext.prep.prepare import load_prepared_slides
from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.io.atomic import remove_stale_temporaries, write_json_atomic, write_npz_atomic
from monai_wsi_ext.model.predict import encode_slide
from monai_wsi_ext.utils import file_sha256, resolve_device

__all__ = ["FeatureExtractor"]

logger = logging.getLogger(__name__)


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

    Each feature file is written atomically (a temporary file in ``output_dir``, renamed when complete; see
    :mod:`monai_wsi_ext.io.atomic`): a kill or a full disk never leaves a truncated ``.npz`` under its name, a
    write error fails the slide naming the path (``No space left on device: could not write <path>``), and the
    temporary files a killed run left in ``output_dir`` are removed when the next run starts.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        output_dir: feature folder.
        encoder: a :class:`~monai_wsi_ext.model.networks.PatchEncoder` (weights already loaded, or see ``checkpoint``).
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
        self.device = resolve_device(device)
        self.encoder = encoder
        self.checkpoint = checkpoint
        self.splits = splits
        self.batch_size, self.crop_size, self.stain_normalize = batch_size, crop_size, stain_normalize
        self.backend, self.channels_last, self.overwrite, self.num_workers = backend, channels_last, overwrite, \
            num_workers

    def _load(self) -> str:
        if self.checkpoint:
            from monai_wsi_ext.model.networks import load_checkpoint

            load_checkpoint(self.encoder, self.checkpoint, option="encoder_ckpt")
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
        remove_stale_temporaries(self.output_dir)
        done, skipped, failed = [], [], {}
        for meta in slides:
            sid = meta.slide_id
            out = self.output_dir / f"{sid}.npz"
            table_sha = file_sha256(Path(meta.dir) / "patches.csv")
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
                grid = meta.grid
                source = SlidePatchSource.from_prepared(meta, transform, self.backend, self.num_workers)
                feats, probs = encode_slide(self.encoder, source, self.batch_size, self.device, self.channels_last)
                source.close()
                write_npz_atomic(out, features=feats, probs=probs, rows=grid.rows, cols=grid.cols, labels=grid.labels,
                                 grid_shape=np.asarray(grid.shape), cell_size=np.float64(grid.cell_size),
                                 split=np.str_(meta.split), slide_id=np.str_(sid),
                                 image=np.str_(meta.image), mpp=np.float64(meta.mpp or np.nan),
                                 dimensions=np.asarray(meta.dimensions), cache_key=np.str_(cache_key))
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
