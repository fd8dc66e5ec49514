"""Slide inference: slides -> tissue, patch grid (in memory) -> encoder -> canvas U-Net -> heatmaps and records.

The pieces are declared in ``bundle/configs/inference.json`` (reader, patch transform, :class:`SlideDataset`,
encoder and U-Net, :class:`~monai_wsi_ext.model.predict.CanvasInferer`, the
:class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` and its handlers); :class:`SlideInference` builds the same
pieces from Python (the exported-model path, the Deploy application and the benchmarks use it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform, slide_item
from monai_wsi_ext.engines.e2e import slide_collate
from monai_wsi_ext.engines.evaluators import SlideEvaluator
from monai_wsi_ext.engines.handlers import StrictCheckpointLoader
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.wsi import SlideReader
from monai_wsi_ext.model.predict import CanvasInferer
from monai_wsi_ext.outputs.handlers import HeatmapWriter, InferenceSummary
from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, collect_inputs, load_prepared_slides, \
    prepare_config, prepare_in_memory, slide_timeout_for
from monai_wsi_ext.runtime.modules import runtime_network
from monai_wsi_ext.utils import resolve_device, split_set

__all__ = ["SlideDataset", "SlideInference"]

logger = logging.getLogger(__name__)


class SlideDataset(Dataset):
    """One item per slide for the slide evaluator: new slides are prepared in memory (tissue, grid, labels when
    an annotation is found; nothing written), a prepared folder is read as it is.

    Items are :func:`~monai_wsi_ext.data.patches.slide_item` dicts (``patch_source``, ``rows``, ``cols``,
    ``labels``, ``slide_id``, ``prepared``), or ``{"slide_id", "error"}`` for a slide that could not be prepared
    (the evaluator records it and goes on).

    Args:
        slides: a folder of slides, a slide file, or a list; or None with ``manifest``/``prepared_dir``.
        manifest: a dataset manifest (its slides are used; ``split`` filters).
        prepared_dir: an existing ``prepare_dataset`` output (used when neither ``slides`` nor ``manifest``).
        split: split filter for manifests and prepared folders.
        prepare: :class:`~monai_wsi_ext.prep.prepare.PrepareConfig` or its keyword arguments (``prepare.json``).
        reader: a :class:`~monai_wsi_ext.io.wsi.SlideReader` (its backend and mpp override are used).
        transform: the patch transform (default: the eval transform with a 224 px centre crop).
        num_workers: decoder threads of the batched patch reads.
    """

    def __init__(self, slides=None, manifest: str | None = None, prepared_dir: str | None = None,
                 split: str | Sequence[str] | None = None, prepare: dict | PrepareConfig | None = None,
                 reader: SlideReader | None = None, transform=None, num_workers: int = 2):
        self.reader = reader or SlideReader()
        cfg = copy.copy(prepare_config(prepare))  # the reader's backend and mpp are set on it below
        if self.reader.mpp is not None:
            cfg.mpp = self.reader.mpp
        cfg.backend = self.reader.backend
        self.cfg = cfg
        self.transform = transform if transform is not None else make_patch_transform(False, 224)
        self.num_workers = num_workers
        if slides is None and manifest is None:
            if prepared_dir is None:
                raise ConfigError("give `input_slides`, a `manifest` or a `prepared_dir`.")
            self.items = load_prepared_slides(prepared_dir, split)
            if not self.items:
                raise ConfigError(f"{prepared_dir}: no prepared slides for split {split!r}.")
        else:
            inputs = collect_inputs(slides=slides, manifest=manifest)
            splits = split_set(split)
            if splits is not None and manifest is not None:
                inputs = [i for i in inputs if i.split in splits]
            if not inputs:
                raise ConfigError(f"no slides found in {slides or manifest!r}" +
                                  (f" for split {split!r}" if manifest is not None else ""))
            self.items = inputs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        entry = self.items[index]
        try:
            if isinstance(entry, SlideInput):
                # prepare#slide_timeout_s bounds the slide's opening and tissue/grid reads (a slow or forged file)
                with slide_timeout_for(self.cfg, entry):
                    prepared = prepare_in_memory(entry, self.cfg,
                                                 self.reader.open(entry.image, entry.extra.get("mpp")))
            else:
                prepared = entry
            source = SlidePatchSource.from_prepared(prepared, self.transform, self.reader.backend, self.num_workers)
        except (MonaiWsiExtError, OSError, ValueError) as e:
            sid = entry.slide_id
            return {"slide_id": sid, "error": f"{type(e).__name__}: {e}"}
        return slide_item(prepared, source)


class SlideInference:
    """Slides -> tumor heatmaps from Python, with the components ``inference.json`` declares: a
    :class:`SlideDataset`, a :class:`~monai_wsi_ext.model.predict.CanvasInferer`, a
    :class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` that skips and records failing slides, strict
    checkpoint loading, the :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter` and the
    :class:`~monai_wsi_ext.outputs.handlers.InferenceSummary` (``run`` raises when any slide failed).

    Args:
        output_dir: where heatmaps go (one folder per slide).
        encoder: patch encoder.
        unet: canvas U-Net (None: ``mode="classifier"``).
        encoder_checkpoint: encoder weights file (strictly loaded).
        unet_checkpoint: U-Net weights file (strictly loaded).
        slides, manifest, prepared_dir, split, prepare: see :class:`SlideDataset`.
        canvas_size, canvas_mode, mode, batch_size, channels_last: see :class:`CanvasInferer`.
        threshold: tumor threshold of the GeoJSON regions.
        device: ``cpu``, ``cuda`` or ``auto``.
        crop_size: eval centre crop.
        backend: slide reader backend.
        stain_normalize: Macenko normalisation before encoding.
        config: the configuration recorded in each record.
        weight_files: name -> file of the weights in use, for the record's checksums, when the networks come
            loaded (e.g. exported files) rather than from the checkpoints.
        itk_format: also write the map as an ITK image (``nrrd``/``mha``).
        dicom_seg, dicom_annotations: DICOM outputs for DICOM slides (see
            :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter`).
        runtime: ``torch`` (default), ``onnxruntime``, ``openvino``, ``tensorrt`` or ``auto`` (the fastest installed),
            for both networks (:func:`monai_wsi_ext.runtime.runtime_network`; an ONNX runtime exports the loaded
            networks when the run starts). Networks that already are :class:`~monai_wsi_ext.runtime.RuntimeNetwork`
            (exported models) keep their own.
        precision: ``fp32``, ``bf16`` or ``int8`` (the encoder from ``int8_encoder``; the U-Net stays fp32).
        int8_encoder: the calibrated int8 encoder (``scripts/calibrate_int8.py``), with ``precision="int8"``.
        runtime_threads: runtime threads (default: torch's).
        prob_channel: the ``canvas_prob_channel`` option the U-Net was trained with (the encoder head's probability
            as canvas channel ``feature_dim``; exported models carry it in their embedded settings).
    """

    def __init__(self, output_dir: str, encoder: torch.nn.Module, unet: torch.nn.Module | None = None,
                 encoder_checkpoint: str | None = None, unet_checkpoint: str | None = None, slides=None,
                 manifest: str | None = None, prepared_dir: str | None = None, split: str | Sequence[str] | None = None,
                 prepare: dict | None = None, canvas_size: int = 512, canvas_mode: str = "slide",
                 mode: str = "canvas", threshold: float = 0.5, device="auto", batch_size: int = 64,
                 crop_size: int | None = 224, backend: str = "auto", channels_last: bool = True,
                 stain_normalize: bool = False, config: dict | None = None, weight_files: dict | None = None,
                 itk_format: str | None = None, dicom_seg: str | list | None = None, dicom_annotations: bool = False,
                 runtime: str = "torch", precision: str = "fp32", int8_encoder: str | None = None,
                 runtime_threads: int | None = None, prob_channel: bool = False):
        if mode not in ("canvas", "classifier"):
            raise ValueError(f"`mode` must be 'canvas' or 'classifier', got {mode!r}.")
        if mode == "canvas" and unet is None:
            raise ValueError("`mode='canvas'` needs a `unet`.")
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device)
        self.unet = unet.to(self.device) if unet is not None else None
        self.mode = mode
        prepare = dict(prepare or {})
        prepare.setdefault("backend", backend)
        self.writer = HeatmapWriter(output_dir, threshold, config=config,
                                    weights={"encoder": encoder_checkpoint, "unet": unet_checkpoint,
                                             **(weight_files or {})}, itk_format=itk_format, backend=backend,
                                    dicom_seg=dicom_seg, dicom_annotations=dicom_annotations)
        self.dataset_args = dict(slides=slides, manifest=manifest, prepared_dir=prepared_dir, split=split,
                                 prepare=prepare, reader=SlideReader(backend=prepare["backend"], mpp=prepare.get("mpp")),
                                 transform=make_patch_transform(False, crop_size, stain_normalize))
        self.run_encoder = runtime_network(self.encoder, "encoder", runtime, precision, int8_encoder, runtime_threads)
        self.run_unet = None if self.unet is None else runtime_network(
            self.unet, "unet", runtime, "fp32" if precision == "int8" else precision, None, runtime_threads)
        self.inferer = CanvasInferer(self.run_encoder, canvas_size, canvas_mode, batch_size, channels_last, mode,
                                     prob_channel=prob_channel)
        self.loaders = [StrictCheckpointLoader(encoder_checkpoint, self.encoder, "encoder_ckpt")]
        if self.unet is not None and mode == "canvas":
            self.loaders.append(StrictCheckpointLoader(unet_checkpoint, self.unet, "unet_ckpt"))
        self.output_dir = Path(output_dir)

    def run(self) -> dict:
        dataset = SlideDataset(**self.dataset_args)
        loader = DataLoader(dataset, batch_size=1, collate_fn=slide_collate, num_workers=0)
        network = self.run_unet if self.mode == "canvas" else self.run_encoder
        evaluator = SlideEvaluator(self.device, loader, network=network, inferer=self.inferer, on_failure="skip",
                                   val_handlers=[*self.loaders, self.writer,
                                                 InferenceSummary(self.output_dir, self.mode)])
        evaluator.run()
        return evaluator.state.summary
