"""Feature extraction: every prepared slide's patches through the encoder into a feature file.

The pieces are declared in ``bundle/configs/extract_features.json``, on the pattern of ``inference.json``: the
reader, the eval patch transform, a :class:`~monai_wsi_ext.inference.slides.SlideDataset` over the prepared
folder, the encoder, a :class:`~monai_wsi_ext.model.predict.CanvasInferer` in ``classifier`` mode (it encodes the
slide's patches with :func:`~monai_wsi_ext.model.predict.encode_slide`), strict checkpoint loading, the
:class:`~monai_wsi_ext.outputs.handlers.FeatureWriter` (atomic ``.npz`` files, unchanged slides skipped) and the
:class:`~monai_wsi_ext.outputs.handlers.FeatureSummary`, run by the
:class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` (one slide per iteration, failing slides recorded).
:class:`FeatureExtractor` builds the same pieces from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from monai_wsi_ext.data.patches import make_patch_transform
from monai_wsi_ext.engines.e2e import slide_collate
from monai_wsi_ext.engines.evaluators import SlideEvaluator
from monai_wsi_ext.engines.handlers import StrictCheckpointLoader
from monai_wsi_ext.inference.slides import SlideDataset
from monai_wsi_ext.io.wsi import SlideReader
from monai_wsi_ext.model.predict import CanvasInferer
from monai_wsi_ext.outputs.handlers import FeatureSummary, FeatureWriter
from monai_wsi_ext.runtime.modules import runtime_network
from monai_wsi_ext.utils import resolve_device

__all__ = ["FeatureExtractor"]


class FeatureExtractor:
    """Per-slide feature canvases on disk, from Python, with the components ``extract_features.json`` declares:
    ``<output_dir>/<slide_id>.npz`` with ``features`` (N, C), ``probs`` (the encoder head's tumor probability per
    patch, the classifier-only baseline), ``rows``, ``cols``, ``labels``, ``grid_shape``, ``cell_size``,
    ``split`` and a ``cache_key`` (see :class:`~monai_wsi_ext.outputs.handlers.FeatureWriter`). A slide whose
    patch table, encoder checkpoint and transform are unchanged is not recomputed.

    Each feature file is written atomically (a temporary file in ``output_dir``, renamed when complete; see
    :mod:`monai_wsi_ext.io.atomic`): a kill or a full disk never leaves a truncated ``.npz`` under its name, a
    write error fails the slide naming the path (``No space left on device: could not write <path>``), and the
    temporary files a killed run left in ``output_dir`` are removed when the next run starts. ``run`` raises when
    any slide failed, after writing ``features_summary.json``.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        output_dir: feature folder.
        encoder: a :class:`~monai_wsi_ext.model.networks.PatchEncoder` (weights already loaded, or see ``checkpoint``).
        checkpoint: encoder weights file to load strictly (None: use ``encoder`` as is, e.g. random or frozen
            features).
        device: ``cpu``, ``cuda`` or ``auto``.
        splits: splits to extract (None: all).
        batch_size: patches per encoder call.
        crop_size: centre crop of the eval transform.
        stain_normalize: Macenko normalisation before encoding.
        backend: slide reader backend.
        channels_last: NHWC memory format (about 2x faster on CPU for GoogLeNet).
        overwrite: recompute every slide.
        num_workers: decoder threads of the batched patch reads.
        runtime: ``torch`` (default), ``onnxruntime``, ``openvino``, ``tensorrt`` or ``auto`` (see
            :func:`monai_wsi_ext.runtime.runtime_network`; an ONNX runtime exports the loaded encoder when the run
            starts).
        precision: ``fp32``, ``bf16`` or ``int8`` (the calibrated ``int8_encoder``); a precision other than fp32
            enters the feature files' cache key.
        int8_encoder: the calibrated int8 encoder (``scripts/calibrate_int8.py``).
        runtime_threads: runtime threads (default: torch's).
    """

    def __init__(self, prepared_dir: str, output_dir: str, encoder: torch.nn.Module, checkpoint: str | None = None,
                 device="auto", splits: Sequence[str] | None = None, batch_size: int = 64,
                 crop_size: int | None = 224, stain_normalize: bool = False, backend: str = "auto",
                 channels_last: bool = True, overwrite: bool = False, num_workers: int = 2, runtime: str = "torch",
                 precision: str = "fp32", int8_encoder: str | None = None, runtime_threads: int | None = None):
        self.prepared_dir, self.output_dir = Path(prepared_dir), Path(output_dir)
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device)
        self.splits = splits
        self.dataset_args = dict(prepared_dir=str(prepared_dir), split=splits, reader=SlideReader(backend=backend),
                                 transform=make_patch_transform(False, crop_size, stain_normalize),
                                 num_workers=num_workers)
        self.loader = StrictCheckpointLoader(checkpoint, self.encoder, "encoder_ckpt")
        self.run_encoder = runtime_network(self.encoder, "encoder", runtime, precision, int8_encoder, runtime_threads)
        self.inferer = CanvasInferer(self.run_encoder, batch_size=batch_size, channels_last=channels_last,
                                     mode="classifier")
        desc = {"crop": crop_size, "stain": stain_normalize}
        if precision != "fp32":  # as extract_features.json#handlers#1#transform_desc
            desc.update(precision=precision, model=int8_encoder)
        self.writer = FeatureWriter(output_dir, self.encoder, checkpoint, desc, overwrite)

    def _load(self) -> None:
        """Strict checkpoint loading (what the config's ``StrictCheckpointLoader`` does when the run starts), done
        here before the slides are listed: a checkpoint that does not fit fails before any slide is read."""
        self.loader()

    def run(self) -> dict:
        """Encode every prepared slide (of ``splits``) that is not up to date.

        Returns:
            The summary (``done``, ``skipped``, ``failed``, ``output_dir``).

        Raises:
            ConfigError: when the checkpoint does not fit the encoder, or there is no prepared slide.
            MonaiWsiExtError: at the end, when any slide failed.
        """
        self._load()
        dataset = SlideDataset(**self.dataset_args)
        loader = DataLoader(dataset, batch_size=1, collate_fn=slide_collate, num_workers=0)
        evaluator = SlideEvaluator(self.device, loader, network=self.encoder, inferer=self.inferer,
                                   on_failure="skip", val_handlers=[self.writer, FeatureSummary(self.output_dir)])
        evaluator.run()
        return evaluator.state.summary
