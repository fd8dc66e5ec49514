"""ONNX export of the two networks the configs define, with the settings inference needs in the model's metadata.

The encoder graph takes ``patches`` (N, 3, H, W) float32 and returns ``features`` (N, feature_dim) and ``logits``
(N, num_classes) (the head on the features, for the classifier baseline and the ``canvas_prob_channel`` option), with
a dynamic batch axis and the patch size of the example (the crop the settings give: ``export_onnx_network`` takes
``crop_size``, else ``patch_size``; a runtime network exports for the size of the first batch it gets, and again
for another size). The U-Net graph takes ``canvas`` (N, C, H, W) and returns ``logits`` (N, K, H, W), with dynamic
batch, height and width (any canvas whose sides the U-Net's strides divide). Export uses ``torch.onnx.export`` with
the ``torch.export``-based (dynamo) exporter; the TorchScript-based one is deprecated in this torch release. An
encoder whose stain normalisation does not export (Vahadane's per-patch dictionary learning) is exported from after
that step, with the step's settings under ``wsi_canvas.stain_norm``; :class:`~monai_wsi_ext.runtime.RuntimeNetwork`
runs it in torch before the graph.

The model's ``metadata_props`` carry :data:`META_NETWORK` (``encoder``/``unet``), :data:`META_PRECISION`
(``fp32``/``int8``), :data:`META_SETTINGS` (the resolved settings JSON of
:data:`monai_wsi_ext.export.bundle.SETTINGS_KEYS`, so a model file alone says how to tile slides for it) and
whatever else the caller adds (the bundle's ``metadata.json``).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import atomic_path

__all__ = ["NETWORK_KINDS", "META_NETWORK", "META_PRECISION", "META_SETTINGS", "META_BUNDLE", "EncoderGraph",
           "require_onnx", "export_onnx", "torch_stain_step", "read_onnx_metadata", "set_onnx_metadata",
           "onnx_max_abs_diff"]

logger = logging.getLogger(__name__)

NETWORK_KINDS = ("encoder", "unet")
META_NETWORK = "wsi_canvas.network"
META_PRECISION = "wsi_canvas.precision"
META_SETTINGS = "wsi_canvas.settings"
META_BUNDLE = "monai.bundle.metadata"
ENCODER_INPUT, ENCODER_OUTPUTS = "patches", ("features", "logits")
UNET_INPUT, UNET_OUTPUTS = "canvas", ("logits",)


class EncoderGraph(nn.Module):
    """The exported encoder: ``(features, logits)`` of a :class:`~monai_wsi_ext.model.networks.PatchEncoder` (or of a
    module with ``features`` and ``head``; a plain module's output is taken as the features, with no logits)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        f = enc.features_after_stain(x) if torch_stain_step(enc) is not None else enc.features(x)
        act = getattr(enc, "act", None)
        return f, enc.head(act(f) if act is not None else f)


def torch_stain_step(encoder: nn.Module) -> nn.Module | None:
    """The encoder's active stain normalisation when it does not export (Vahadane), else None. The exported graph
    then starts after it and :data:`~monai_wsi_ext.model.normalization.META_STAIN_NORM` describes it."""
    stain = getattr(getattr(encoder, "module", encoder), "stain_norm", None)
    if stain is not None and getattr(stain, "active", False) and not getattr(stain, "exportable", True):
        return stain
    return None


def require_onnx(dynamo: bool = False):
    """Import ``onnx`` (and ``onnxscript``, which the dynamo exporter needs).

    Raises:
        ConfigError: naming the ``onnx`` extra when they are not installed.
    """
    try:
        import onnx

        if dynamo:
            importlib.import_module("onnxscript")
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the packages onnx and onnxscript ({e}); install them with "
                          "`pip install monai-wsi-canvas[onnx]` (from a checkout: `pip install -e .[onnx]`).") from None
    return onnx


def _check_kind(network: str) -> str:
    if network not in NETWORK_KINDS:
        raise ConfigError(f"`network` must be one of {list(NETWORK_KINDS)}, got {network!r}.")
    return network


def _example(network: str, module: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example
    gen = torch.Generator().manual_seed(0)
    if network == "encoder":
        return torch.rand(2, 3, 224, 224, generator=gen)
    in_ch = getattr(module, "in_channels", None)
    if in_ch is None:
        first = next((p for p in module.parameters() if p.ndim == 4), None)
        if first is None:
            raise ConfigError("cannot tell the U-Net's input channels; pass `example`.")
        in_ch = first.shape[1]
    return torch.rand(2, int(in_ch), 64, 64, generator=gen)


def set_onnx_metadata(model_proto, metadata: Mapping[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries of an ``onnx.ModelProto``."""
    keep = [p for p in model_proto.metadata_props if p.key not in metadata]
    del model_proto.metadata_props[:]
    for p in keep:
        model_proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in metadata.items():
        model_proto.metadata_props.add(key=str(k), value=v if isinstance(v, str) else json.dumps(v))


def export_onnx(module: nn.Module, network: str, filepath: str | os.PathLike | None = None,
                example: torch.Tensor | None = None, metadata: Mapping[str, str] | None = None,
                settings: Mapping | None = None, dynamo: bool = True, opset: int = 18) -> bytes:
    """Export the encoder or the U-Net to ONNX (eval mode; the module's own mode is restored afterwards).

    Args:
        module: a :class:`~monai_wsi_ext.model.networks.PatchEncoder` (``network="encoder"``) or the canvas U-Net.
        network: ``encoder`` or ``unet``.
        filepath: where to write the model (atomically); None: only return the bytes.
        example: example input (default: (2, 3, 224, 224) for the encoder, (2, C, 64, 64) for the U-Net); the
            encoder graph keeps its height and width.
        metadata: further ``metadata_props`` entries.
        settings: the inference settings to embed as :data:`META_SETTINGS`.
        dynamo: the ``torch.export``-based exporter (default); False uses the deprecated TorchScript-based one.
        opset: ONNX opset.

    Returns:
        The serialised model.

    Raises:
        ConfigError: an unknown ``network``, or the export failed (the exporter's message is included).
    """
    from monai_wsi_ext.model.predict import eval_mode

    onnx = require_onnx(dynamo)
    _check_kind(network)
    x = _example(network, module, example).to(next(module.parameters()).device)
    graph = EncoderGraph(module) if network == "encoder" else module
    in_name, out_names = (ENCODER_INPUT, ENCODER_OUTPUTS) if network == "encoder" else (UNET_INPUT, UNET_OUTPUTS)
    start = time.perf_counter()
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]  # per-pass INFO lines
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    with eval_mode(graph), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=65536)
                # the encoder's patch size is fixed (the crop; symbolic sizes make torch.export several times
                # slower through GoogLeNet's pooling), the U-Net's canvas size is not
                shapes = {0: batch} if network == "encoder" else {0: batch, 2: torch.export.Dim.AUTO,
                                                                    3: torch.export.Dim.AUTO}
                prog = torch.onnx.export(graph, (x,), input_names=[in_name], output_names=list(out_names),
                                         dynamic_shapes=(shapes,), dynamo=True, opset_version=opset, verbose=False)
                proto = prog.model_proto
            else:
                axes = {in_name: {0: "batch"}, **{o: {0: "batch"} for o in out_names}}
                if network == "unet":
                    axes = {in_name: {0: "batch", 2: "height", 3: "width"},
                            out_names[0]: {0: "batch", 2: "height", 3: "width"}}
                buf = io.BytesIO()
                torch.onnx.export(graph, (x,), buf, input_names=[in_name], output_names=list(out_names),
                                  dynamic_axes=axes, dynamo=False, opset_version=opset)
                proto = onnx.load_from_string(buf.getvalue())
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            raise ConfigError(f"ONNX export of the {network} failed ({type(e).__name__}: {e}).") from e
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    meta = {META_NETWORK: network, META_PRECISION: "fp32"}
    stain = torch_stain_step(module) if network == "encoder" else None
    if stain is not None:
        from monai_wsi_ext.model.normalization import META_STAIN_NORM

        meta[META_STAIN_NORM] = json.dumps(stain.settings())
    if settings is not None:
        meta[META_SETTINGS] = json.dumps(dict(settings), default=str)
    meta.update(metadata or {})
    set_onnx_metadata(proto, meta)
    data = proto.SerializeToString()
    logger.info("ONNX export of the %s: %.1f s (%s exporter), %.1f MB", network, time.perf_counter() - start,
                "dynamo" if dynamo else "TorchScript", len(data) / 1e6)
    if filepath is not None:
        _write(Path(filepath), data)
    return data


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
        Path(tmp).chmod(0o644)


def read_onnx_metadata(model: str | os.PathLike | bytes) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model file (or serialised model), as a dict.

    Raises:
        ConfigError: the file is missing or not an ONNX model.
    """
    onnx = require_onnx()
    try:
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model, load_external_data=False)
        else:
            if not Path(model).is_file():
                raise ConfigError(f"ONNX model {str(model)!r} does not exist.")
            proto = onnx.load(str(model), load_external_data=False)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ConfigError(f"{model if not isinstance(model, bytes) else 'model'}: not an ONNX model "
                          f"({type(e).__name__}: {e})") from None
    return {p.key: p.value for p in proto.metadata_props}


def onnx_max_abs_diff(session, module: nn.Module, network: str, inputs: Sequence[torch.Tensor] | torch.Tensor
                      ) -> dict[str, float]:
    """Largest absolute difference between a runtime session and the eager module on the same inputs, per output
    (``features``/``logits`` for the encoder, ``logits`` for the U-Net)."""
    from monai_wsi_ext.model.predict import eval_mode

    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    out: dict[str, float] = {}
    with eval_mode(module), torch.no_grad():
        for x in batches:
            if network == "encoder":
                want = EncoderGraph(module)(x)
                names = ENCODER_OUTPUTS
            else:
                want = (module(x),)
                names = UNET_OUTPUTS
            got = session(x)
            for name, w, g in zip(names, want, got):
                d = float((w.float().cpu() - g.float().cpu()).abs().max())
                out[name] = max(out.get(name, 0.0), d)
    return out
