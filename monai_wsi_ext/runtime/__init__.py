"""Inference runtimes of the encoder and the canvas U-Net: eager torch, ONNX Runtime, OpenVINO (and ONNX Runtime's
TensorRT execution provider on GPUs), at fp32, bf16 or calibrated int8; ONNX export of the networks.

See ``bundle/docs/runtimes.md``. The ONNX runtimes are optional extras (``onnx``, ``openvino``); nothing here imports
them until a runtime that needs them is asked for.
"""

from __future__ import annotations

from monai_wsi_ext.runtime.backends import (
    EXTRAS,
    PRECISIONS,
    RUNTIMES,
    check_precision,
    require_runtime,
    resolve_runtime,
    runtime_available,
)
from monai_wsi_ext.runtime.modules import RuntimeNetwork, runtime_network

__all__ = ["EXTRAS", "PRECISIONS", "RUNTIMES", "check_precision", "require_runtime", "resolve_runtime",
           "runtime_available", "RuntimeNetwork", "runtime_network"]
