"""One small exception family, so that callers can skip a bad slide and go on with the rest."""

from __future__ import annotations

__all__ = ["MonaiWsiExtError", "WSIReadError", "AnnotationError", "TissueError", "ConfigError"]


class MonaiWsiExtError(Exception):
    """Base class of every error this package raises on purpose."""


class WSIReadError(MonaiWsiExtError, OSError):
    """A slide is missing, truncated, corrupt or in a format no installed backend can read."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AnnotationError(MonaiWsiExtError, ValueError):
    """An annotation file is missing, malformed, unsafe (e.g. an XML entity bomb) or of an unknown layout."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class TissueError(MonaiWsiExtError, ValueError):
    """Tissue detection could not run (e.g. an external mask that does not match the slide)."""


class ConfigError(MonaiWsiExtError, ValueError):
    """A configuration value is out of range or inconsistent."""
