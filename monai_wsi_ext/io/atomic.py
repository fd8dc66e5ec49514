"""Atomic file writing: outputs are written to a temporary file next to the target and renamed.

Every output of the runtime (heatmaps, records, overlays, feature files, summaries, metrics, exports; checkpoints have
their own writer in :mod:`monai_wsi_ext.engines.checkpoints`) goes through :func:`atomic_path` or
:func:`atomic_open`:

* the data goes to ``.<name>.XXXXXXXX<suffix>`` in the destination's folder (``XXXXXXXX``: 8 random characters of
  :func:`tempfile.mkstemp`; ``<suffix>`` is the destination's own, e.g. ``.meta.json.k2j4x9_a.json``), is
  ``fsync``-ed and renamed onto the final name (:func:`os.replace`), so the final name holds the old file or the
  complete new one, never a truncated one;
* on any error, ``KeyboardInterrupt`` and ``SystemExit`` included, the temporary file is removed;
* an ``OSError`` while writing (a full disk, no permission, a read-only file system...) is re-raised as an
  :class:`AtomicWriteError`, an ``OSError`` with the same ``errno`` whose message starts with the OS reason
  (``No space left on device``) and names the final path;
* a temporary file left by a kill (``SIGKILL``, power loss) is removed by the next run writing into that folder:
  :func:`remove_stale_temporaries` (it matches only the pattern above, see :func:`is_temporary_name`), and readers
  that list a folder skip such names.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.utils import json_default

__all__ = [
    "AtomicWriteError",
    "atomic_path",
    "atomic_open",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "write_npy_atomic",
    "write_npz_atomic",
    "is_temporary_name",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

# ``.<final name>.<8 characters of tempfile's alphabet><the final name's suffix>``; the suffix must be non-empty and
# equal to the final name's (checked in is_temporary_name), so that names like ``.cache.settings`` never match
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<random>[a-z0-9_]{8})(?P<suffix>\.[^.]+)")


class AtomicWriteError(MonaiWsiExtError, OSError):
    """An output file could not be written (disk full, permissions, ...); nothing was left under its name.

    Attributes:
        path: the final path that was not written.
        reason: the OS reason (e.g. ``No space left on device``).
    """

    def __init__(self, path: str | os.PathLike, cause: OSError):
        self.path = str(path)
        self.reason = cause.strerror or (os.strerror(cause.errno) if cause.errno else str(cause))
        code = cause.errno if cause.errno is not None else errno_codes.EIO
        super().__init__(code, f"{self.reason}: could not write {self.path} (no file was left under this name; "
                               "a previous file of this name, if any, is unchanged)")

    def __reduce__(self):  # picklable (e.g. across DataLoader / multiprocessing workers)
        return type(self), (self.path, OSError(self.errno, self.reason))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_file(path: Path) -> None:
    """``fsync`` a closed file: the data is on disk before the rename, and a write error the OS deferred (e.g. a full
    disk on a network file system) surfaces here rather than after the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    For writers that take a file name (PIL, tifffile, ITK, ``torch.jit.save``); :func:`atomic_open` gives a file
    object instead. On any exception (``KeyboardInterrupt`` included) the temporary file is removed and nothing is
    left under ``path``.

    Args:
        path: final destination.
        suffix: suffix of the temporary file (defaults to the destination's, so writers that look at the
            extension, e.g. PIL or tifffile, still pick the right format).
        fsync: ``fsync`` the temporary file before the rename.

    Raises:
        AtomicWriteError: an ``OSError`` while creating, writing or renaming the file (same ``errno``; the message
            starts with the OS reason, e.g. ``No space left on device``, and names ``path``). Errors of this
            package (e.g. a :class:`~monai_wsi_ext.errors.WSIReadError` in the block) and other exceptions pass
            unchanged.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path),
                                       suffix=suffix if suffix is not None else path.suffix, dir=path.parent)
            tmp_path = Path(tmp)
            os.close(fd)
        except OSError as e:
            raise AtomicWriteError(path, e) from e
        try:
            yield tmp_path
            if fsync:
                _fsync_file(tmp_path)
            # mkstemp creates 0600 files; give the output the permissions a plain open() would have
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, path)
            tmp_path = None
        except MonaiWsiExtError:
            raise
        except OSError as e:
            raise AtomicWriteError(path, e) from e
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)


class _FdFile(io.RawIOBase):
    """A seekable binary file on a descriptor whose every write goes through :func:`os.write` until all bytes are
    written (a short write is continued, an error is raised as the ``OSError`` it is).

    It has no ``fileno()`` on purpose: numpy, PIL, zipfile and tifffile then write through :meth:`write` rather than
    with their own C calls, so every output takes one code path.
    """

    def __init__(self, fd: int, name: str):
        super().__init__()
        self._fd, self.name = fd, name

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return done

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = os.read(self._fd, len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else int(size)
        os.ftruncate(self._fd, size)
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, fsync: bool = True) -> Iterator[io.RawIOBase]:
    """Yield a binary, seekable file object on a temporary file next to ``path``; rename it onto ``path`` only if
    the block succeeds (see :func:`atomic_path` for the errors and the cleanup).

    Pass it to ``np.save``/``np.savez``, ``PIL.Image.save``, ``tifffile.TiffWriter``, ``zipfile``...: all of them
    write through its ``write``, i.e. :func:`os.write`.
    """
    with atomic_path(path, fsync=fsync) as tmp:
        f = _FdFile(os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0)), str(tmp))
        with f:
            yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default) and return the path."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def write_npy_atomic(path: str | os.PathLike, array: Any) -> Path:
    """``np.save(path, array, allow_pickle=False)``, atomically; returns the path (no ``.npy`` is appended)."""
    with atomic_open(path) as f:
        np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def write_npz_atomic(path: str | os.PathLike, compressed: bool = False, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)`` (``np.savez_compressed`` with ``compressed``), atomically, streamed to disk;
    returns the path (no ``.npz`` is appended)."""
    with atomic_open(path) as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return Path(path)


def is_temporary_name(name: str) -> bool:
    """Whether a file name is a temporary file of :func:`atomic_path` / :func:`atomic_open`:
    ``.<final name>.<8 characters of [a-z0-9_]><the final name's suffix>``, e.g. ``.meta.json.k2j4x9_a.json`` or
    ``.train_003_overlay.png.3m_q0zzt.png`` (a final name without a suffix never gets a matching temporary name, so
    hidden files such as ``.cache.settings`` are never taken for one)."""
    m = _TEMP_NAME.fullmatch(name)
    return m is not None and Path(m.group("name")).suffix == m.group("suffix")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an earlier, killed run left in ``folder`` (not in its sub-folders).

    Only regular files whose name matches :func:`is_temporary_name` are removed: no other file, no folder, no
    symbolic link. Call it when a run starts writing into a folder that only it writes at that time (a temporary
    file of another process writing there at the same moment would be removed too).

    Args:
        folder: the output folder (a missing folder is not an error).

    Returns:
        The files removed.
    """
    root = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not is_temporary_name(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info("%s: removed %d temporary file(s) left by an interrupted run: %s", root, len(removed),
                    ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    return removed
