"""Exported models -> slide heatmaps, without MONAI Deploy (the application in :mod:`.app` calls these).

Model folders, as ``scripts/export_bundle.py`` writes them or as a MONAI Application Package holds them::

    models/encoder.ts, models/unet.ts                     # export_bundle output (or encoder_e2e.ts, ...)
    models/encoder/<one file>, models/unet/<one file>     # MONAI Deploy "named model" layout

Each ``.ts`` carries the settings it was trained with (:data:`monai_wsi_ext.export.bundle.SETTINGS_FILE`: patch
size and level, crop, canvas size and mode, stain normalisation, mpp), so the slides are tiled as in training
without a config file next to the models.
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
_SHARED = ("feature_dim", "patch_size", "patch_level", "crop_size", "canvas_size", "canvas_mode", "stain_normalize")


@dataclass
class ExportedModels:
    """Loaded TorchScript networks, their files and the settings embedded in them."""

    encoder: torch.nn.Module
    unet: torch.nn.Module | None
    files: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)


def find_model_files(model_path: str | os.PathLike, suffix: str | None = None) -> dict[str, Path]:
    """Locate the encoder and U-Net TorchScript files in a model folder.

    Args:
        model_path: a folder with ``encoder{suffix}.ts``/``unet{suffix}.ts``, or with sub-folders ``encoder/`` and
            ``unet/`` holding one file each (MONAI Deploy's named-model layout).
        suffix: ``""`` (separate training) or ``"_e2e"`` (end-to-end); ``None`` accepts either when only one is
            present.

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
        if suffix is not None:
            candidates = [root / f"{name}{suffix}.ts"] if (root / f"{name}{suffix}.ts").is_file() else []
        else:
            candidates = sorted(p for p in root.glob(f"{name}*.ts") if p.stem in (name, f"{name}_e2e"))
        if len(candidates) > 1:
            raise ConfigError(f"{root}: several {name} models {[p.name for p in candidates]}; choose one with "
                              "`suffix` ('' for separate training, '_e2e' for end-to-end).")
        if candidates:
            found[name] = candidates[0]
    if "encoder" not in found:
        raise ConfigError(f"{root}: no encoder model (expected encoder.ts, encoder_e2e.ts or encoder/<file>); "
                          "export one with scripts/export_bundle.py.")
    return found


def load_exported_models(model_path: str | os.PathLike, device: str | torch.device = "cpu",
                         suffix: str | None = None) -> ExportedModels:
    """Load the TorchScript encoder (and U-Net) from a model folder, with their embedded settings.

    Raises:
        ConfigError: missing files, or encoder and U-Net exported with different settings.
    """
    files = find_model_files(model_path, suffix)
    settings: dict[str, Any] = {}
    nets = {}
    for name, path in files.items():
        nets[name], got = load_exported(path, device)
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
                           threshold: float = 0.5, batch_size: int = 64, backend: str = "auto",
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
        batch_size: patches per encoder call.
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
        raise ConfigError("mode 'canvas' needs a U-Net model (unet.ts) next to the encoder.")
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
        canvas_mode=str(st.get("canvas_mode", "slide")), mode=mode, threshold=float(threshold), device=device,
        batch_size=int(batch_size), crop_size=st.get("crop_size", 224), backend=backend,
        stain_normalize=bool(st.get("stain_normalize", False)),
        config={"models": models.files, "settings": st, "mode": mode, "threshold": threshold},
        weight_files={k: v for k, v in models.files.items() if mode == "canvas" or k == "encoder"},
        itk_format=itk_format, dicom_seg=dicom_seg, dicom_annotations=dicom_annotations,
    )
    return inference.run()
