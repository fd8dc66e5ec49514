"""A network on a chosen runtime that the rest of the pipeline uses like the torch module it stands for.

:class:`RuntimeNetwork` wraps either the eager network the config builds (``runtime: torch`` runs it as it is; an
ONNX runtime exports it when first called, and again whenever its weights changed, e.g. after a checkpoint was
loaded into it) or an ONNX model file (the exported-model path, and the int8 models of
:mod:`monai_wsi_ext.runtime.int8`). Torch tensors go in and come out, so
:func:`~monai_wsi_ext.model.predict.encode_batches`, :func:`~monai_wsi_ext.model.predict.canvas_probabilities` and
MONAI's sliding-window inferer need no change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.runtime.backends import check_precision, open_session, resolve_runtime

__all__ = ["RuntimeNetwork", "runtime_network"]

logger = logging.getLogger(__name__)


class RuntimeNetwork(nn.Module):
    """The encoder or the canvas U-Net on a runtime.

    For the encoder, ``features(x)`` gives the (N, feature_dim) features, ``features_and_logits(x)`` the features
    and the head's logits in one call (what :func:`~monai_wsi_ext.model.predict.encode_batches` uses), and
    ``forward(x)`` the logits. For the U-Net, ``forward(canvas)`` gives the logits.

    Args:
        module: the eager network (weights loaded now or later); None with ``model_file``.
        network: ``encoder`` or ``unet``.
        runtime: ``torch``, ``onnxruntime``, ``openvino``, ``tensorrt`` or ``auto`` (the fastest installed one that
            runs ``precision``, see :func:`~monai_wsi_ext.runtime.backends.resolve_runtime`).
        precision: ``fp32``; ``bf16`` (torch: ``torch.autocast``; OpenVINO: its bf16 inference precision);
            ``int8`` (only with a calibrated ``model_file`` whose calibration report is next to it).
        model_file: an ONNX model (from ``scripts/export_bundle.py`` or ``scripts/calibrate_int8.py``) used instead
            of exporting ``module``.
        device: where the runtime computes (default: the module's device, else the CPU).
        threads: runtime threads (default: ``torch.get_num_threads()``).
        dynamo: export with the ``torch.export``-based exporter (default) or the deprecated TorchScript one.

    Raises:
        ConfigError: unknown names, a runtime that is not installed (naming its extra), ``int8`` without a
            calibrated model or with a model whose calibration report is missing or does not match it, a model
            file of the other network.
    """

    def __init__(self, module: nn.Module | None = None, network: str = "encoder", runtime: str = "torch",
                 precision: str = "fp32", model_file: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, threads: int | None = None, dynamo: bool = True,
                 _report_check: bool = True):
        super().__init__()
        self._report_check = _report_check  # False only while calibrate_int8 measures the report it then writes
        if network not in ("encoder", "unet"):
            raise ConfigError(f"`network` must be 'encoder' or 'unet', got {network!r}.")
        check_precision(precision)
        if module is None and model_file is None:
            raise ConfigError(f"the {network} on a runtime needs the eager network or an ONNX `model_file`.")
        if precision == "int8" and model_file is None:
            raise ConfigError(f"`precision` 'int8' needs a calibrated int8 ONNX model of the {network} "
                              "(scripts/calibrate_int8.py writes one with its calibration report); give its path.")
        self.network, self.precision, self.threads, self.dynamo = network, precision, threads, dynamo
        self.model_file = None if model_file is None else Path(model_file)
        self.runtime = resolve_runtime(runtime, precision, onnx_only=module is None)
        self.module = module
        self._device = torch.device(device) if device is not None else None
        self._session = None
        self._fingerprint = None
        self._file_stain = None
        self.metadata: dict[str, str] = {}
        self.settings: dict = {}
        if self.model_file is not None:
            self._open_file()
        if module is not None:
            self.feature_dim = getattr(module, "feature_dim", None)

    # ------------------------------------------------------------------ sessions
    def _open_file(self) -> None:
        from monai_wsi_ext.runtime.onnx import META_NETWORK, META_PRECISION, META_SETTINGS, read_onnx_metadata

        if self.runtime == "torch":
            raise ConfigError(f"{self.model_file}: an ONNX model needs `runtime` 'onnxruntime' or 'openvino'.")
        meta = read_onnx_metadata(self.model_file)
        kind = meta.get(META_NETWORK)
        if kind is not None and kind != self.network:
            raise ConfigError(f"{self.model_file}: an ONNX model of the {kind}, given as the {self.network}.")
        file_precision = meta.get(META_PRECISION, "fp32")
        if file_precision == "int8" and self._report_check:
            from monai_wsi_ext.runtime.int8 import check_calibration_report

            check_calibration_report(self.model_file)
        if self.precision == "int8" and file_precision != "int8":
            raise ConfigError(f"{self.model_file}: `precision` 'int8' asked for, but the model is {file_precision}; "
                              "calibrate one with scripts/calibrate_int8.py.")
        if file_precision == "int8":
            self.precision = "int8"
        self.metadata = meta
        if self.network == "encoder":
            from monai_wsi_ext.model.normalization import stain_norm_from_metadata

            self._file_stain = stain_norm_from_metadata(meta)
        self.settings = _json(meta.get(META_SETTINGS))
        if self.settings.get("feature_dim") is not None:
            self.feature_dim = int(self.settings["feature_dim"])
        self._session = open_session(str(self.model_file), self.runtime, self._device or "cpu", self.threads,
                                     self.precision)
        logger.info("%s: %s on %s (%s)", self.model_file, self.network, self.runtime, self.precision)

    def _weights_fingerprint(self) -> tuple:
        # in-place updates (load_state_dict copies into the tensors) bump a tensor's version counter
        return tuple((t.data_ptr(), t._version) for t in (*self.module.parameters(), *self.module.buffers()))

    def session(self, x: torch.Tensor | None = None):
        """The runtime session, (re)exported from the eager module when its weights changed since the last export
        (or, for the encoder, when ``x`` has another patch size than the graph)."""
        if self.model_file is not None:
            return self._session
        shape = tuple(x.shape[2:]) if x is not None and self.network == "encoder" else None
        fp = (self._weights_fingerprint(), shape)
        if self._session is None or fp != self._fingerprint:
            from monai_wsi_ext.runtime.onnx import export_onnx

            example = None if x is None else x[:2].detach().float().contiguous()
            data = export_onnx(self.module, self.network, example=example, dynamo=self.dynamo)
            self._session = open_session(data, self.runtime, self._compute_device(), self.threads, self.precision)
            self._fingerprint = fp
        return self._session

    def _compute_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        p = next(self.module.parameters(), None) if self.module is not None else None
        return p.device if p is not None else torch.device("cpu")

    @property
    def accepts_channels_last(self) -> bool:
        """Whether NHWC inputs are useful (only for eager torch; ONNX runtimes take contiguous NCHW arrays)."""
        return self.runtime == "torch"

    # ------------------------------------------------------------------ calls
    def _autocast(self):
        dev = self._compute_device()
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder: ``(features (N, feature_dim), logits (N, num_classes))`` in float32."""
        if self.network != "encoder":
            raise ConfigError("`features_and_logits` is the encoder's; this is the U-Net.")
        if self.runtime == "torch":
            enc = self.module
            with self._autocast():
                f = enc.features(x)
                act = getattr(enc, "act", None)
                logits = enc.head(act(f) if act is not None else f)
            return f.float(), logits.float()
        x = self.preprocess(x)
        f, logits = self.session(x)(x)
        return f, logits

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """What runs in torch before an ONNX encoder graph: the stain normalisation that does not export
        (Vahadane; from the model file's metadata or the eager module), else nothing."""
        if self.network != "encoder" or self.runtime == "torch":
            return x
        if self.model_file is not None:
            stain = self._file_stain
        else:
            from monai_wsi_ext.runtime.onnx import torch_stain_step

            stain = torch_stain_step(self.module)
        return x if stain is None else stain(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder: the (N, feature_dim) features."""
        return self.features_and_logits(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.network == "encoder":
            return self.features_and_logits(x)[1]
        if self.runtime == "torch":
            with self._autocast():
                return self.module(x).float()
        return self.session(x)(x)[0]

    def extra_repr(self) -> str:
        src = str(self.model_file) if self.model_file is not None else "eager module"
        return f"network={self.network}, runtime={self.runtime}, precision={self.precision}, from={src}"


def _json(text: str | None) -> dict:
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"embedded settings are not valid JSON ({e}).") from None
    return value if isinstance(value, dict) else {}


def runtime_network(module: nn.Module | None, network: str = "encoder", runtime: str = "torch",
                    precision: str = "fp32", model_file: str | None = None, threads: int | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """The network the inferer should call: ``module`` itself for ``runtime: torch`` at ``fp32`` (nothing changes
    for the default), else a :class:`RuntimeNetwork`. The configs use this (``inference.json#runtime_encoder``,
    ``#runtime_network``, ``extract_features.json#runtime_encoder``)."""
    check_precision(precision)
    if runtime == "torch" and precision == "fp32" and model_file is None and module is not None:
        return module
    return RuntimeNetwork(module, network, runtime, precision, model_file, device, threads)
