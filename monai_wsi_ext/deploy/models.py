"""Exported models -> slide heatmaps, without MONAI Deploy (the application in :mod:`.app` calls these).

Model folders, as ``scripts/export_bundle.py`` writes them or as a MONAI Application Package holds them::

    models/encoder.onnx, models/unet.onnx                 # export_bundle output (or encoder_e2e.onnx, ...)
    models/encoder.int8.onnx + encoder.int8.calibration.json   # scripts/calibrate_int8.py (precision int8)
    models/encoder.ts, models/unet.ts                     # legacy TorchScript export
    models/encoder/<one file>, models/unet/<one file>     # MONAI Deploy "named model" layout

Each model carries the settings it was trained with (ONNX: ``metadata_props``; ``.ts``:
:data:`monai_wsi_ext.export.bundle.SETTINGS_FILE`: patch size and level, crop, canvas size and mode, stain
normalisation, mpp), so the slides are tiled as in training without a config file next to the models. ONNX models
run on ONNX Runtime or OpenVINO (``runtime``, :mod:`monai_wsi_ext.runtime`); ``.ts`` files run in torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_wsi_ext.export.bundle import load_exported
from monai_wsi_ext.errors import ConfigError

__all__ = ["ExportedModels", "find_model_files", "list_slides", "load_exported_models", "run_exported_inference"]

logger = logging.getLogger(__name__)

_NAMES = ("encoder", "unet")
# settings both files must agree on (they were exported from one training run)
_SHARED = ("feature_dim", "patch_size", "patch_level", "crop_size", "canvas_size", "canvas_mode", "canvas_prob_channel",
           "stain_normalize")


@dataclass
class ExportedModels:
    """Loaded networks (ONNX on a runtime, or legacy TorchScript), their files and the settings embedded in them."""

    encoder: torch.nn.Module
    unet: torch.nn.Module | None
    files: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)


def find_model_files(model_path: str | os.PathLike, suffix: str | None = None, precision: str = "fp32"
                     ) -> dict[str, Path]:
    """Locate the encoder and U-Net model files in a model folder.

    Args:
        model_path: a folder with ``encoder{suffix}.onnx``/``unet{suffix}.onnx`` (or the legacy ``.ts``; ONNX is
            taken when both are there), or with sub-folders ``encoder/`` and ``unet/`` holding one file each
            (MONAI Deploy's named-model layout).
        suffix: ``""`` (separate training) or ``"_e2e"`` (end-to-end); ``None`` accepts either when only one is
            present.
        precision: ``int8`` takes the calibrated ``encoder{suffix}.int8.onnx`` (the U-Net stays fp32).

    Returns:
        ``{"encoder": path, "unet": path}``; ``unet`` is absent when the folder has only an encoder (then only
        ``mode="classifier"`` can run).

    Raises:
        ConfigError: no encoder, or several candidates for one network.
    """
    root = Path(model_path)
    if not root.is_dir():
        raise ConfigError(f"model folder {str(root)!r} does not exist or is not a folder.")
    found: dict[str, Path] = {}
    for name in _NAMES:
        sub = root / name
        if sub.is_dir():
            files = [p for p in sub.iterdir() if p.is_file()]
            if len(files) != 1:
                raise ConfigError(f"{sub}: a named-model folder must hold exactly one model file, found "
                                  f"{sorted(p.name for p in files)}.")
            found[name] = files[0]
            continue
        # int8 applies to the encoder; the U-Net stays fp32
        ext = ".int8.onnx" if precision == "int8" and name == "encoder" else None
        by_format = {}
        for fmt in ([ext] if ext else [".onnx", ".ts"]):
            stems = [suffix] if suffix is not None else ["", "_e2e"]
            hits = [root / f"{name}{s}{fmt}" for s in stems if (root / f"{name}{s}{fmt}").is_file()]
            if len(hits) > 1:
                raise ConfigError(f"{root}: several {name} models {[p.name for p in hits]}; choose one with "
                                  "`suffix` ('' for separate training, '_e2e' for end-to-end).")
            if hits:
                by_format[fmt] = hits[0]
        if by_format:
            found[name] = next(iter(by_format.values()))  # ONNX before the legacy TorchScript file
            if len(by_format) > 1:
                logger.info("%s: using %s (also found %s)", root, found[name].name,
                            [p.name for p in list(by_format.values())[1:]])
    if "encoder" not in found:
        want = "encoder.int8.onnx (scripts/calibrate_int8.py)" if precision == "int8" else \
            "encoder.onnx, encoder_e2e.onnx, encoder.ts or encoder/<file>"
        raise ConfigError(f"{root}: no encoder model (expected {want}); export one with scripts/export_bundle.py.")
    return found


def load_exported_models(model_path: str | os.PathLike, device: str | torch.device = "cpu",
                         suffix: str | None = None, runtime: str | None = None, precision: str | None = None
                         ) -> ExportedModels:
    """Load the encoder (and U-Net) from a model folder, with their embedded settings.

    Args:
        model_path: see :func:`find_model_files`.
        device: where the networks run.
        suffix: see :func:`find_model_files`.
        runtime: for ONNX models: ``onnxruntime``, ``openvino``, ``tensorrt`` or ``auto`` (the fastest installed;
            see :mod:`monai_wsi_ext.runtime`); legacy ``.ts`` files run in torch. None: the ``WSI_CANVAS_RUNTIME``
            environment variable (how the Deploy application is configured), else ``auto``.
        precision: ``fp32`` or ``int8`` (the calibrated encoder, refused without its calibration report). None:
            ``WSI_CANVAS_PRECISION``, else ``fp32``.

    Raises:
        ConfigError: missing files, a runtime that is not installed (naming its extra), an int8 model without its
            report, or encoder and U-Net exported with different settings.
    """
    from monai_wsi_ext.runtime.backends import check_precision

    runtime = runtime or os.environ.get("WSI_CANVAS_RUNTIME") or "auto"
    precision = precision or os.environ.get("WSI_CANVAS_PRECISION") or "fp32"
    if check_precision(precision) == "bf16":
        raise ConfigError("exported models run at `precision` 'fp32' or 'int8' ('bf16' is for the torch runtime of "
                          "the bundle configs and for OpenVINO through `runtime`).")
    files = find_model_files(model_path, suffix, precision)
    settings: dict[str, Any] = {}
    nets = {}
    for name, path in files.items():
        nets[name], got = load_exported(path, device, runtime=runtime,
                                        precision=precision if name == "encoder" else "fp32")
        clash = {k: (settings[k], got[k]) for k in _SHARED if k in settings and k in got and settings[k] != got[k]}
        if clash:
            raise ConfigError(f"{path}: exported with settings that differ from the encoder's: {clash}; export both "
                              "networks from the same training run and overlays.")
        settings.update(got)
    logger.info("models from %s: %s; settings %s", model_path, {k: str(v) for k, v in files.items()}, settings)
    return ExportedModels(nets["encoder"], nets.get("unet"), {k: str(v) for k, v in files.items()}, settings)


def list_slides(folder: str | os.PathLike) -> list[str]:
    """The slide files in a folder (or the file itself), as ``prepare.collect_inputs`` picks them.

    Raises:
        ConfigError: the path does not exist or holds no slide.
    """
    from monai_wsi_ext.prep.prepare import collect_inputs

    path = Path(folder)
    if not path.exists():
        raise ConfigError(f"input {str(path)!r} does not exist.")
    return [inp.image for inp in collect_inputs(slides=path)]  # raises ConfigError for a folder without slides


def run_exported_inference(slides, output_dir: str | os.PathLike, models: ExportedModels, mode: str | None = None,
                           threshold: float = 0.5, batch_size: int | None = None, backend: str = "auto",
                           mpp: float | None = None, device: str | torch.device = "cpu",
                           prepare: dict | None = None, itk_format: str | None = None,
                           dicom_seg: str | list | None = None, dicom_annotations: bool = False) -> dict:
    """Heatmaps for slides with exported models: :class:`~monai_wsi_ext.inference.slides.SlideInference` with the
    tiling, crop and canvas settings embedded in the models.

    Args:
        slides: a folder, a slide file or a list of slide files.
        output_dir: one sub-folder of outputs per slide, plus ``inference_summary.json``.
        models: from :func:`load_exported_models`.
        mode: ``canvas`` (encoder + U-Net) or ``classifier``; default ``canvas`` when a U-Net is loaded.
        threshold: tumor threshold of the GeoJSON regions.
        batch_size: patches per encoder call (default: 16 on the CPU, the fastest batch on 2 cores in
            BENCHMARKS.md's encoder table; 64 on a GPU).
        backend: slide reader.
        mpp: level-0 µm/px for slides whose files carry none (overrides the embedded ``mpp``).
        device: where the networks run.
        prepare: further :class:`~monai_wsi_ext.prep.prepare.PrepareConfig` fields, over the embedded ones.
        itk_format: also write each map as an ITK image with physical spacing (``nrrd`` or ``mha``).
        dicom_seg, dicom_annotations: DICOM outputs of DICOM slides (see
            :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter`).

    Returns:
        The inference summary (per-slide results and failures).

    Raises:
        MonaiWsiExtError: after all slides ran, when any failed (the summary file lists them).
    """
    from monai_wsi_ext.inference.slides import SlideInference

    st = models.settings
    mode = mode or ("canvas" if models.unet is not None else "classifier")
    if mode == "canvas" and models.unet is None:
        raise ConfigError("mode 'canvas' needs a U-Net model (unet.onnx or unet.ts) next to the encoder.")
    prep = dict(st.get("prepare") or {})
    prep.setdefault("patch_size", st.get("patch_size", 256))
    prep.setdefault("level", st.get("patch_level", 0))
    prep["backend"] = backend
    if mpp is not None or st.get("mpp") is not None:
        prep["mpp"] = float(mpp if mpp is not None else st["mpp"])
    prep.update(prepare or {})
    inference = SlideInference(
        output_dir=str(output_dir), encoder=models.encoder, unet=models.unet if mode == "canvas" else None,
        slides=slides, prepare=prep, canvas_size=int(st.get("canvas_size", 512)),
        canvas_mode=str(st.get("canvas_mode", "slide")), prob_channel=bool(st.get("canvas_prob_channel", False)),
        mode=mode, threshold=float(threshold), device=device,
        batch_size=int(batch_size or (16 if torch.device(device).type == "cpu" else 64)),
        crop_size=st.get("crop_size", 224), backend=backend,
        stain_normalize=bool(st.get("stain_normalize", False)),
        config={"models": models.files, "settings": st, "mode": mode, "threshold": threshold,
                "runtime": getattr(models.encoder, "runtime", "torch"),
                "precision": getattr(models.encoder, "precision", "fp32")},
        weight_files={k: v for k, v in models.files.items() if mode == "canvas" or k == "encoder"},
        itk_format=itk_format, dicom_seg=dicom_seg, dicom_annotations=dicom_annotations,
    )
    return inference.run()
