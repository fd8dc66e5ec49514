"""Small helpers every stage shares: file hashes, device choice, JSON conversion and the one logging format."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["LOG_FORMAT", "file_sha256", "json_clean", "json_default", "module_device", "resolve_device",
           "setup_logging", "split_set"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The log line format of every script and of ``bundle/configs/logging.conf``."""


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once for a command-line entry point (scripts, the Deploy app)."""
    logging.basicConfig(level=str(level).upper() if isinstance(level, str) else level, format=LOG_FORMAT, force=True)


def file_sha256(path: str | os.PathLike | None, chunk: int = 1 << 20) -> str | None:
    """SHA-256 of a file (None for None or a missing file)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_device(device=None):
    """``None``/``"auto"`` -> CUDA when available else CPU; anything else through ``torch.device``."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def module_device(module, device=None):
    """``(device, dtype)`` a module computes in: ``device`` when given, else that of its first floating parameter."""
    import torch

    p = next((q for q in module.parameters() if q.is_floating_point()), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    return dev, (p.dtype if p is not None else torch.get_default_dtype())


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, paths and enums as text."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def json_clean(obj: Any) -> Any:
    """A copy of ``obj`` with NaN/inf floats as None and numpy scalars/arrays as Python values (strict JSON)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def split_set(split) -> set[str] | None:
    """A split filter (None, one name or several) as a set of names (None: every split)."""
    if split is None:
        return None
    return {split} if isinstance(split, str) else set(split)
