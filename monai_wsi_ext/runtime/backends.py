"""Inference runtimes of the two networks: which are installed, which ``auto`` picks, and sessions over ONNX models
that behave like torch modules (torch tensors in, torch tensors out).

``torch`` (eager PyTorch) is always there. ``onnxruntime`` (CPU execution provider; CUDA and TensorRT execution
providers when ``onnxruntime-gpu`` is installed and the device is a GPU) comes with the ``onnx`` extra, ``openvino``
(CPU) with the ``openvino`` extra. A runtime that is asked for and not installed is a
:class:`~monai_wsi_ext.errors.ConfigError` that names the extra to install.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from monai_wsi_ext.errors import ConfigError

__all__ = ["RUNTIMES", "PRECISIONS", "EXTRAS", "runtime_available", "require_runtime", "resolve_runtime",
           "check_precision", "OrtSession", "OpenVinoSession", "open_session"]

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")
"""Runtime names of the ``runtime`` config key (``auto`` picks an installed one, see :func:`resolve_runtime`)."""

PRECISIONS = ("fp32", "bf16", "int8")
"""Precision names of the ``precision`` config key."""

# runtime -> (module to import, extra of pyproject.toml)
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino"),
             "tensorrt": ("onnxruntime", "onnx")}
EXTRAS = {name: extra for name, (_, extra) in _PACKAGES.items()}
"""Runtime -> the optional extra of ``monai-wsi-canvas`` that installs it."""

# which runtime ``auto`` takes, fastest first per precision, as measured on the 2-core CPU (BENCHMARKS.md,
# bench_inference.py: fp32 ONNX Runtime ahead of OpenVINO and eager torch; int8 OpenVINO about 2x ONNX Runtime)
AUTO_ORDER = {"fp32": ("onnxruntime", "openvino", "torch"), "int8": ("openvino", "onnxruntime"),
              "bf16": ("openvino", "torch")}

# precisions each runtime runs
_RUNTIME_PRECISIONS = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8"),
                       "tensorrt": ("fp32", "int8")}


def _import(runtime: str):
    module, _ = _PACKAGES[runtime]
    return importlib.import_module(module)


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime`` can run here (its package imports; for ``tensorrt``, ONNX Runtime lists the TensorRT
    execution provider)."""
    if runtime == "torch":
        return True
    try:
        mod = _import(runtime)
    except ImportError:
        return False
    if runtime == "tensorrt":
        return "TensorrtExecutionProvider" in mod.get_available_providers()
    return True


def require_runtime(runtime: str):
    """Import the package of ``runtime`` (None for ``torch``).

    Raises:
        ConfigError: an unknown runtime, or one whose package is not installed (the message names the extra).
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"`runtime` must be one of {['auto', *RUNTIMES]}, got {runtime!r}.")
    if runtime == "torch":
        return None
    try:
        mod = _import(runtime)
    except ImportError as e:
        extra = EXTRAS[runtime]
        raise ConfigError(f"`runtime` {runtime!r} needs the package {_PACKAGES[runtime][0]!r}, which is not installed "
                          f"({e}); install it with `pip install monai-wsi-canvas[{extra}]` "
                          f"(from a checkout: `pip install -e .[{extra}]`), or set `runtime` to 'torch'.") from None
    if runtime == "tensorrt" and "TensorrtExecutionProvider" not in mod.get_available_providers():
        raise ConfigError("`runtime` 'tensorrt' needs ONNX Runtime's TensorRT execution provider "
                          "(onnxruntime-gpu built with TensorRT); this onnxruntime has "
                          f"{mod.get_available_providers()}.")
    return mod


def resolve_runtime(runtime: str = "auto", precision: str = "fp32", onnx_only: bool = False) -> str:
    """The runtime to use: ``runtime`` itself (checked to be installed), or for ``auto`` the fastest installed one
    that runs ``precision`` (``AUTO_ORDER``, measured here: fp32 ONNX Runtime, OpenVINO, torch; int8 OpenVINO, then
    ONNX Runtime; bf16 OpenVINO, then torch).

    Args:
        runtime: a name of :data:`RUNTIMES` or ``auto``.
        precision: a name of :data:`PRECISIONS`.
        onnx_only: the model is an ONNX file (torch cannot run it).

    Raises:
        ConfigError: unknown names, a runtime that is not installed (naming its extra), a precision the runtime
            does not run.
    """
    check_precision(precision)
    if runtime == "auto":
        for name in AUTO_ORDER[precision]:
            if onnx_only and name == "torch":
                continue
            if runtime_available(name):
                return name
        need = "onnx" if precision != "bf16" else "openvino"
        what = "an ONNX model" if onnx_only else f"precision {precision!r}"
        raise ConfigError(f"no installed runtime runs {what}; install one with `pip install monai-wsi-canvas[{need}]`.")
    require_runtime(runtime)
    if onnx_only and runtime == "torch":
        raise ConfigError("an ONNX model needs `runtime` 'onnxruntime' or 'openvino' (or 'auto'), not 'torch'; "
                          "install one with `pip install monai-wsi-canvas[onnx]`.")
    if precision not in _RUNTIME_PRECISIONS[runtime]:
        raise ConfigError(f"`precision` {precision!r} is not run by `runtime` {runtime!r} "
                          f"(it runs {list(_RUNTIME_PRECISIONS[runtime])}).")
    return runtime


def check_precision(precision: str) -> str:
    """``precision`` itself, or a ConfigError naming the known ones."""
    if precision not in PRECISIONS:
        raise ConfigError(f"`precision` must be one of {list(PRECISIONS)}, got {precision!r}.")
    return precision


def _threads(threads: int | None) -> int:
    return int(threads) if threads else max(1, torch.get_num_threads())


class OrtSession:
    """An ONNX Runtime inference session called with torch tensors.

    Args:
        model: the ONNX model (file path or serialised bytes).
        device: ``cpu`` runs the CPU execution provider; a CUDA device adds the CUDA execution provider (and the
            TensorRT one when ``tensorrt``), which need ``onnxruntime-gpu``.
        threads: intra-op threads (default: ``torch.get_num_threads()``, so one thread setting serves both).
        tensorrt: put the TensorRT execution provider first.
    """

    runtime = "onnxruntime"

    def __init__(self, model: str | bytes, device: str | torch.device = "cpu", threads: int | None = None,
                 tensorrt: bool = False):
        ort = require_runtime("tensorrt" if tensorrt else "onnxruntime")
        self.device = torch.device(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _threads(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            index = self.device.index or 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            if tensorrt:
                providers.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
            missing = [p[0] for p in providers[:-1] if p[0] not in ort.get_available_providers()]
            if missing:
                raise ConfigError(f"ONNX Runtime on {self.device} needs the execution providers {missing} "
                                  "(install onnxruntime-gpu instead of onnxruntime); this one has "
                                  f"{ort.get_available_providers()}.")
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
                for n, x in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names, feed)
        return [torch.from_numpy(o).to(self.device) for o in outs]


class OpenVinoSession:
    """An OpenVINO compiled model (CPU) called with torch tensors.

    Args:
        model: the ONNX model (file path or serialised bytes).
        device: only ``cpu``.
        threads: inference threads (default: ``torch.get_num_threads()``).
        bf16: run in bfloat16 (OpenVINO's ``INFERENCE_PRECISION_HINT``; fast only on CPUs with AVX512-BF16/AMX).
    """

    runtime = "openvino"

    def __init__(self, model: str | bytes, device: str | torch.device = "cpu", threads: int | None = None,
                 bf16: bool = False):
        ov = require_runtime("openvino")
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ConfigError(f"`runtime` 'openvino' runs on the CPU here, got device {self.device}.")
        core = ov.Core()
        net = core.read_model(model=model if isinstance(model, bytes) else str(model))
        config = {"INFERENCE_NUM_THREADS": _threads(threads), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        self.compiled = core.compile_model(net, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = [np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()) for x in inputs]
        res = self.request.infer(feed)
        return [torch.from_numpy(np.array(res[o])) for o in self.compiled.outputs]


def open_session(model: str | bytes, runtime: str, device: str | torch.device = "cpu", threads: int | None = None,
                 precision: str = "fp32"):
    """An :class:`OrtSession` or :class:`OpenVinoSession` over an ONNX model for a resolved ``runtime``."""
    if runtime in ("onnxruntime", "tensorrt"):
        return OrtSession(model, device, threads, tensorrt=runtime == "tensorrt")
    if runtime == "openvino":
        return OpenVinoSession(model, device, threads, bf16=precision == "bf16")
    raise ConfigError(f"`runtime` {runtime!r} does not run ONNX models.")

