"""Slide reading built on MONAI's WSI readers, with a backend choice that falls back cleanly.

``open_slide(path, backend="auto")`` tries cuCIM, then OpenSlide, then tiffslide (a tifffile-based reader that
decodes only the tiles it needs). A backend is accepted only when it opens the file *and* decodes a probe region,
so a JPEG 2000 slide a backend cannot decode falls through to the next one. The choice is logged.

MONAI's own ``tifffile`` backend decodes a whole level for every patch and is never used here.

Reads are bounded: ``open_slide`` refuses a TIFF whose stored data cannot hold the image its header declares,
``Slide.thumbnail`` reads in blocks within a pixel budget (:data:`MAX_READ_PIXELS`), and :func:`slide_timeout`
limits the time spent on one slide. cuCIM's CPU-run cuFile messages are filtered out of its import.

Coordinates: ``(x, y)`` are level-0 pixel coordinates; sizes are ``(width, height)`` at the read level; arrays
are ``(height, width, 3)`` uint8 RGB.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from monai.data import CuCIMWSIReader, OpenSlideWSIReader
from monai.utils import optional_import

from monai_wsi_ext.errors import ConfigError, WSIReadError
from monai_wsi_ext.io.dicom import is_dicom_file, is_dicom_slide

__all__ = ["BACKENDS", "Slide", "SlideReader", "SlideTimeoutError", "TiffSlideWSIReader", "open_slide",
           "available_backends", "slide_timeout", "check_slide_timeout", "validate_mpp", "MAX_READ_PIXELS",
           "MAX_THUMBNAIL_PIXELS"]

logger = logging.getLogger(__name__)

BACKENDS = ("cucim", "openslide", "tiffslide")


# Batches per native cuCIM call in ``Slide.read_regions``: enough for cuCIM to pipeline decoding, few enough that
# a reader stopped early finishes the outstanding span quickly.
_CUCIM_SPAN_BATCHES = 8

#: Most level pixels a thumbnail or tissue image may read (a single-level slide of 32768 x 32768): beyond it a slide
#: without a small enough pyramid level is refused rather than decoded for minutes (``Slide.thumbnail``).
MAX_READ_PIXELS = 2 ** 30
#: Most pixels of a thumbnail read as is from an explicitly chosen level (3 bytes each: 384 MB).
MAX_THUMBNAIL_PIXELS = 2 ** 27
# Side of the blocks a thumbnail is read in (level pixels): peak memory stays near 4096^2 x 3 bytes per block.
_READ_BLOCK_PX = 4096
# Declared (decoded) bytes per stored byte above which a TIFF's image data cannot be what its header says. Real
# slides compress 5-50x; a blank JPEG 2000 or deflate tile of constant colour about 1000x.
_MAX_COMPRESSION_RATIO = 100_000


class SlideTimeoutError(WSIReadError):
    """Reading a slide took longer than the per-slide time limit (:func:`slide_timeout`)."""


# (monotonic deadline, seconds allowed) of the innermost active ``slide_timeout``, or None
_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("slide_deadline",
                                                                                      default=None)


@contextmanager
def slide_timeout(seconds: float | None, path: str | os.PathLike | None = None):
    """Limit the time spent reading one slide: reads started inside the block after ``seconds`` raise
    :class:`SlideTimeoutError` (a :class:`WSIReadError`, so batch loops skip the slide and go on).

    The limit is checked before every region read, between the blocks of a thumbnail, between the batches of
    ``read_regions`` and before each backend ``open_slide`` tries; since thumbnails are read in blocks of bounded
    size, no single decoder call outlasts the limit by much. It cannot interrupt one native call that hangs (e.g.
    a stalled network file system): run slides in separate processes for that. Nested blocks keep the earlier
    deadline. ``seconds`` None or 0 means no limit.

    Example::

        with slide_timeout(cfg.slide_timeout_s, inp.image):
            prepared = prepare_in_memory(inp, cfg)
    """
    if seconds is None or seconds == 0:
        yield
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or \
            seconds < 0:
        raise ConfigError(f"`slide_timeout_s` must be a positive number of seconds (or None/0 for no limit), got "
                          f"{seconds!r}.")
    deadline = time.monotonic() + float(seconds)
    outer = _DEADLINE.get()
    if outer is not None and outer[0] < deadline:
        deadline, seconds = outer
    token = _DEADLINE.set((deadline, float(seconds)))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_slide_timeout(path: str | os.PathLike, what: str = "reading") -> None:
    """Raise :class:`SlideTimeoutError` naming ``path`` when the active :func:`slide_timeout` has run out."""
    limit = _DEADLINE.get()
    if limit is not None and time.monotonic() > limit[0]:
        raise SlideTimeoutError(path, f"timed out: over the per-slide limit of {limit[1]:g} s "
                                      f"(slide_timeout_s) while {what}")


def validate_mpp(mpp, name: str = "mpp") -> float | None:
    """``mpp`` as a float, or None; a value that is not a positive finite number raises :class:`ConfigError`."""
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(mpp, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive number of micrometres per level-0 pixel (e.g. 0.243 for "
                          f"Camelyon16, 0.25 at 40x, 0.5 at 20x), got {mpp!r}.")
    return value


# cuCIM prints these on stdout when it is imported after PyTorch on a machine without a CUDA driver (its GPUDirect
# Storage driver, libcufile from PyTorch's wheels, fails to load libcuda.so.1); they are harmless: cuCIM reads
# slides on the CPU anyway. No cuCIM or cuFile setting turns them off (CUFILE_LOGGING_LEVEL does not), so the import
# runs with stdout/stderr captured and everything but these lines is passed on. Set MONAI_WSI_EXT_CUCIM_QUIET=0 to
# see them.
_CUCIM_NOISE = ("dlopen error libcuda.so", "missing cuda symbols while dynamic loading", "cuFile initialization failed")


def _cuda_driver_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _import_cucim_quietly() -> None:
    """Import cuCIM once with its CPU-run cuFile noise filtered out (see ``_CUCIM_NOISE``)."""
    if "cucim" in sys.modules or os.environ.get("MONAI_WSI_EXT_CUCIM_QUIET", "1").strip().lower() in ("0", "false",
                                                                                                      "no"):
        return
    if not _cuda_driver_present():
        # cuFile would also write cufile.log into the working directory
        os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):  # no real stdout/stderr file descriptors
        optional_import("cucim")
        return
    with tempfile.TemporaryFile() as capture:
        try:
            os.dup2(capture.fileno(), 1)
            os.dup2(capture.fileno(), 2)
            optional_import("cucim")
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
    kept = []
    for line in text.splitlines(keepends=True):
        if any(n in line for n in _CUCIM_NOISE):
            logger.debug("cucim import: %s", line.strip())
        else:
            kept.append(line)
    if kept:
        os.write(2, "".join(kept).encode())


class TiffSlideWSIReader(OpenSlideWSIReader):
    """MONAI WSI reader over `tiffslide` (OpenSlide's API on tifffile + zarr; reads only the tiles it needs)."""

    supported_suffixes = ["tif", "tiff", "svs", "ndpi", "scn", "bif"]
    backend = "tiffslide"

    def read(self, data, **kwargs):
        tiffslide, _ = optional_import("tiffslide")
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        wsis = [tiffslide.TiffSlide(p) for p in paths]
        return wsis[0] if len(wsis) == 1 else wsis

    @staticmethod
    def get_file_path(wsi) -> str:
        return str(Path(wsi._tifffile.filename if hasattr(wsi, "_tifffile") else wsi._filename).resolve())

    def get_mpp(self, wsi, level: int) -> tuple[float, float]:
        mx, my = wsi.properties.get("tiffslide.mpp-x"), wsi.properties.get("tiffslide.mpp-y")
        if mx and my:
            ds = self.get_downsample_ratio(wsi, level)
            return ds * float(my), ds * float(mx)
        raise ValueError("`mpp` cannot be obtained for this file. Please use `level` instead.")


def available_backends() -> list[str]:
    """The backends whose Python packages import on this machine, in preference order."""
    names = {"cucim": "cucim", "openslide": "openslide", "tiffslide": "tiffslide"}
    _import_cucim_quietly()
    return [b for b in BACKENDS if optional_import(names[b])[1]]


def _make_reader(backend: str):
    if backend == "cucim":
        _import_cucim_quietly()
        return CuCIMWSIReader(channel_dim=-1)
    if backend == "openslide":
        return OpenSlideWSIReader(channel_dim=-1)
    if backend == "tiffslide":
        return TiffSlideWSIReader(channel_dim=-1)
    raise ValueError(f"`backend` must be 'auto' or one of {BACKENDS}, got {backend!r}.")


def _check_tiff_integrity(path: Path) -> None:
    """Raise if a TIFF's tiles or strips point past the end of the file (a truncated download or copy)."""
    tifffile, has = optional_import("tifffile")
    if not has:
        return
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    raise WSIReadError(path, f"truncated file: image data of page {page.index} ends at byte "
                                             f"{int((offsets + counts).max())} but the file has {size} bytes")
                _check_declared_size(path, page, counts)
    except WSIReadError:
        raise
    except tifffile.TiffFileError as e:
        raise WSIReadError(path, f"not a readable TIFF ({e})") from e
    except Exception as e:  # noqa: BLE001 - corrupt headers raise many kinds of errors
        raise WSIReadError(path, f"corrupt TIFF structure ({type(e).__name__}: {e})") from e


def _check_declared_size(path: Path, page, counts: np.ndarray) -> None:
    """Raise when a page's stored image data cannot hold the image its header declares (a header edited or forged
    to claim e.g. 150000 x 150000 px over a few bytes, which a fallback reader would then decode for minutes)."""
    shape = tuple(int(v) for v in (getattr(page, "shape", None) or ()))
    dtype = getattr(page, "dtype", None)
    if not shape or dtype is None:
        return
    declared = int(np.prod(shape, dtype=np.float64)) * int(dtype.itemsize)
    if declared == 0:
        return
    where = f"page {page.index} declares {shape[1] if len(shape) > 1 else shape[0]} x {shape[0]} px"
    chunked = getattr(page, "chunked", None)
    expected = int(np.prod(chunked)) if chunked else None
    if expected is not None and counts.size < expected:
        raise WSIReadError(path, f"corrupt TIFF header: {where} in {expected} tiles/strips but lists only "
                                 f"{counts.size}")
    stored = counts[counts > 0]
    if stored.size == 0:
        raise WSIReadError(path, f"corrupt TIFF: {where} but holds no image data (every tile/strip byte count is 0)")
    chunks = getattr(page, "chunks", None)
    chunk_bytes = int(np.prod(chunks, dtype=np.float64)) * int(dtype.itemsize) if chunks else declared
    # decoded bytes of the chunks that have data (missing chunks are legal and read as blank)
    decoded = min(declared, chunk_bytes * int(stored.size))
    compression = int(getattr(page, "compression", 1) or 1)
    limit = 2.0 if compression == 1 else float(_MAX_COMPRESSION_RATIO)
    if decoded > limit * float(stored.sum()):
        raise WSIReadError(path, f"image data cannot be what the header says: {where} ({declared / 1e9:.3g} GB "
                                 f"decoded) but its {stored.size} tile(s)/strip(s) hold only {int(stored.sum())} "
                                 f"bytes, {decoded / float(stored.sum()):.3g} times less than the decoded image "
                                 f"(the most a{' compressed' if compression != 1 else 'n uncompressed'} TIFF can "
                                 f"hold is {limit:g}x); the header is corrupt or forged")


class Slide:
    """An open whole-slide image: levels, mpp, region and batched patch reads.

    Use :func:`open_slide` to create one. Works as a context manager.

    Attributes:
        path: the slide file.
        backend: ``cucim``, ``openslide`` or ``tiffslide``.
        level_dimensions: ``(width, height)`` per level.
        level_downsamples: downsample of each level relative to level 0.
        mpp: level-0 microns per pixel, or None when the file does not say and the caller did not state it.
        mpp_source: ``file``, ``user`` or ``none``.
        warnings: problems worth a line in a run's summary (no mpp, an implausible mpp in the file), as text.
        dicom: the :class:`~monai_wsi_ext.io.dicom.WsiSeries` of a DICOM slide (its UIDs, level-0 instance),
            else None.
    """

    def __init__(self, path: Path, backend: str, reader, handle, mpp: float | None = None):
        self.path = Path(path)
        self.backend = backend
        self.reader = reader
        self.handle = handle
        self._thumbnail_memo: tuple[tuple, np.ndarray] | None = None  # the last thumbnail read, see thumbnail()
        self.dicom = None  # the DICOM WSI series (monai_wsi_ext.io.dicom.WsiSeries) of a DICOM slide
        self.level_count = int(reader.get_level_count(handle))
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        for level in range(self.level_count):
            h, w = reader.get_size(handle, level)
            self.level_dimensions.append((int(w), int(h)))
            self.level_downsamples.append(float(reader.get_downsample_ratio(handle, level)))
        # cuCIM's batched reader needs a tiled file; flat (stripped) TIFFs take its slow path one region at a time
        self._batch_native = backend == "cucim" and all(
            t[0] > 0 for t in handle.resolutions.get("level_tile_sizes", [(0, 0)]))
        self.mpp_source = "none"
        self.mpp: float | None = None
        self.warnings: list[str] = []
        if mpp is not None:
            self.mpp, self.mpp_source = validate_mpp(mpp), "user"
        else:
            file_mpp = self._file_mpp()
            if file_mpp is not None and not (math.isfinite(file_mpp) and 0 < file_mpp < 1000):
                self.warnings.append(f"the file's mpp {file_mpp!r} is not a plausible µm/px; ignored")
                file_mpp = None
            if file_mpp is not None:
                self.mpp, self.mpp_source = file_mpp, "file"
            else:
                self.warnings.append("no mpp: the file has no resolution metadata and none was given (--mpp); "
                                     "physical sizes (µm, mm²) are assumed or omitted")

    def _file_mpp(self) -> float | None:
        if self.backend == "cucim":
            # cuCIM reports a spacing of 1.0 (no unit) when the file has none: only trust real units or Aperio MPP
            meta = self.handle.metadata
            units = [str(u).lower() for u in self.handle.spacing_units()]
            if not ("aperio" in meta and meta["aperio"].get("MPP")) and not any(
                u in ("micrometer", "um", "µm", "micron") for u in units[:2]
            ):
                return None
        try:
            mpp_y, mpp_x = self.reader.get_mpp(self.handle, 0)
        except (ValueError, KeyError, TypeError):
            return None
        return float((mpp_x + mpp_y) / 2) if mpp_x and mpp_y else None

    # ------------------------------------------------------------------ geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel at ``level`` (None when the slide's mpp is unknown)."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float, rtol: float = 0.1) -> int:
        """The level whose mpp is closest to ``target_mpp``, which must lie within ``rtol`` of it.

        Raises:
            WSIReadError: the slide has no mpp (state it with ``open_slide(..., mpp=...)``) or no level is close.
        """
        if self.mpp is None:
            raise WSIReadError(self.path, f"cannot read at {target_mpp} µm/px: the file has no mpp; pass the "
                                          "scanner's level-0 mpp explicitly (e.g. `mpp=0.243` for Camelyon16) "
                                          "or read by level")
        mpps = [self.level_mpp(i) for i in range(self.level_count)]
        best = int(np.argmin([abs(m - target_mpp) for m in mpps]))
        if abs(mpps[best] - target_mpp) > rtol * target_mpp:
            raise WSIReadError(self.path, f"no level within {rtol:.0%} of {target_mpp} µm/px; levels have "
                                          f"{[round(m, 4) for m in mpps]} µm/px")
        return best

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level 0 at least)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(ok) if ok else 0

    # ------------------------------------------------------------------ reading
    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Read a ``(height, width, 3)`` uint8 RGB region whose top-left is level-0 ``(x, y)``."""
        check_slide_timeout(self.path, f"reading a {width}x{height} region at level {level}")
        try:
            patch, _ = self.reader.get_data(self.handle, location=(int(y), int(x)), size=(int(height), int(width)),
                                            level=int(level), mode="RGB")
        except Exception as e:  # noqa: BLE001 - decoder errors come in many types
            raise WSIReadError(self.path, f"{self.backend} failed to read region x={x} y={y} "
                                          f"{width}x{height} at level {level}: {e}") from e
        return np.ascontiguousarray(np.asarray(patch)[..., :3], dtype=np.uint8)

    def read_regions(
        self, locations: np.ndarray | Sequence[tuple[int, int]], size: int | tuple[int, int], level: int = 0,
        num_workers: int = 2, batch_size: int = 64, copy: bool = True,
    ) -> Iterator[np.ndarray]:
        """Read many same-size regions, yielding ``(b, height, width, 3)`` uint8 batches in the given order.

        cuCIM uses its native batched ``read_region`` with ``num_workers`` threads; the other backends read one
        region at a time in a thread pool.

        Args:
            locations: ``(N, 2)`` level-0 ``(x, y)`` of each region's top-left corner.
            size: region size at ``level`` (an int for square regions, or ``(width, height)``).
            level: pyramid level to read from.
            num_workers: decoder threads.
            batch_size: regions per yielded batch.
            copy: when cuCIM splits the read into several batches it reuses their buffers as it goes on, so each
                batch is copied out. ``copy=False`` hands over cuCIM's buffer instead: the batch is then valid only
                until the next one is requested (for callers that consume each batch at once).
        """
        locs = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
        w, h = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        if len(locs) == 0:
            return
        if self._batch_native:
            # One cuCIM call per span of a few batches: cuCIM pipelines the batches within a call, and a caller
            # that stops early waits for at most one span (see ``_cucim_batches``).
            span = int(batch_size) * _CUCIM_SPAN_BATCHES
            for start in range(0, len(locs), span):
                check_slide_timeout(self.path, f"reading patches {start}-{start + span} of {len(locs)}")
                yield from self._cucim_batches(locs[start:start + span], (w, h), int(level), num_workers,
                                               int(batch_size), copy)
            return
        with ThreadPoolExecutor(max_workers=max(int(num_workers), 1)) as pool:
            for start in range(0, len(locs), batch_size):
                check_slide_timeout(self.path, f"reading patches {start}-{start + batch_size} of {len(locs)}")
                chunk = locs[start:start + batch_size]
                yield np.stack(list(pool.map(lambda p: self.read_region(p[0], p[1], w, h, level), chunk)))

    def _cucim_batches(self, locs: np.ndarray, size: tuple[int, int], level: int, num_workers: int,
                       batch_size: int, copy: bool) -> Iterator[np.ndarray]:
        try:
            it = self.handle.read_region([tuple(map(int, p)) for p in locs], size, level,
                                         num_workers=max(int(num_workers), 1), batch_size=batch_size)
        except Exception as e:  # noqa: BLE001
            raise WSIReadError(self.path, f"cucim batch read failed: {e}") from e
        # cuCIM returns a single image instead of an iterator for one location read with batch_size 1
        if not hasattr(it, "__next__"):
            arr = np.asarray(it)
            yield arr[None, ..., :3] if arr.ndim == 3 else arr[..., :3]
            return
        # When cuCIM splits the read into several batches it reuses their buffers as it moves on, so a numpy view
        # of an earlier batch changes under the caller: copy those. A read that fits in one batch owns its buffer
        # (the view's base keeps it alive), so it is handed over without a copy.
        single = len(locs) <= batch_size
        finished = False
        try:
            for batch in it:
                arr = np.asarray(batch)
                arr = arr[None, ..., :3] if arr.ndim == 3 else arr[..., :3]
                yield arr if single or not copy else np.array(arr, dtype=np.uint8, copy=True)
            finished = True
        except Exception as e:  # noqa: BLE001
            finished = True  # cuCIM stopped by itself
            raise WSIReadError(self.path, f"cucim batch read failed: {e}") from e
        finally:
            if not finished:
                # Releasing a batch iterator that cuCIM's workers are still filling corrupts the heap (cuCIM
                # 23.10: "corrupted double-linked list", SIGABRT, seen in about 1 of 4 runs); run it to its end.
                try:
                    for _ in it:
                        pass
                except Exception:  # noqa: BLE001 - the caller has stopped reading; its own exception goes on
                    logger.debug("%s: cucim batch read failed while finishing a read stopped early", self.path)

    def thumbnail(self, max_size: int = 2048, level: int | None = None,
                  max_read_pixels: int | None = None) -> tuple[np.ndarray, float]:
        """A low-resolution RGB image of the whole slide and its downsample relative to level 0.

        Reads are bounded: the level is read in blocks of at most about 4096 x 4096 px (block-averaged as they
        come), never as one full-level array, and a slide whose smallest level is larger than ``max_read_pixels``
        is refused instead of being decoded for minutes.

        Args:
            max_size: upper bound of the thumbnail's longer side when ``level`` is not given: the coarsest level
                is read and, if still larger, reduced by block averaging.
            level: read this level as is instead (at most :data:`MAX_THUMBNAIL_PIXELS` pixels).
            max_read_pixels: most level pixels to decode (default :data:`MAX_READ_PIXELS`).

        Returns:
            ``(image, downsample)`` where ``downsample`` is level-0 width over the image width.

        The last thumbnail is kept while the slide is open: tissue detection and the heatmap overlay of one slide
        (both 2048 px by default) decode it once; every call gets its own copy.

        Raises:
            WSIReadError: the read would exceed the budget (the message names the file and its levels), or it
                timed out (:class:`SlideTimeoutError`).
        """
        level, factor, (out_h, out_w), downsample = self.thumbnail_geometry(max_size, level, max_read_pixels)
        key = (level, factor, out_h, out_w)
        if self._thumbnail_memo is None or self._thumbnail_memo[0] != key:
            self._thumbnail_memo = (key, self._read_level(level, factor, out_h, out_w))
        return self._thumbnail_memo[1].copy(), downsample

    def thumbnail_geometry(self, max_size: int = 2048, level: int | None = None,
                           max_read_pixels: int | None = None) -> tuple[int, int, tuple[int, int], float]:
        """What :meth:`thumbnail` would read, without reading: ``(level, factor, (height, width), downsample)``.

        Raises:
            WSIReadError: as :meth:`thumbnail` for a read over the budget or a level the slide does not have.
        """
        if level is None:
            fits = [i for i, (w, h) in enumerate(self.level_dimensions) if max(w, h) <= max_size]
            level = min(fits) if fits else self.level_count - 1
        level = int(level)
        if not 0 <= level < self.level_count:
            raise WSIReadError(self.path, f"level {level} requested but the slide has {self.level_count} level(s)")
        w, h = self.level_dimensions[level]
        factor = 1
        if max(w, h) > max_size and level == self.level_count - 1:
            factor = min(int(np.ceil(max(w, h) / max_size)), w, h)
        budget = MAX_READ_PIXELS if max_read_pixels is None else int(max_read_pixels)
        levels = ", ".join(f"{lw}x{lh}" for lw, lh in self.level_dimensions)
        if w * h > budget:
            raise WSIReadError(self.path, f"refusing to read level {level} ({w} x {h} px, {w * h / 1e9:.3g} Gpx) "
                                          f"for a thumbnail: over the read budget of {budget / 1e9:.3g} Gpx and the "
                                          f"slide has no smaller level (levels: {levels}); convert it to a "
                                          "pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid "
                                          "--compression jpeg`) or pass a larger `max_read_pixels`")
        out_w, out_h = w // factor, h // factor
        if out_w * out_h > MAX_THUMBNAIL_PIXELS:
            raise WSIReadError(self.path, f"level {level} is {w} x {h} px, more than the {MAX_THUMBNAIL_PIXELS} px "
                                          f"a thumbnail or tissue image may have (levels: {levels}); choose a "
                                          "coarser level")
        return level, factor, (out_h, out_w), self.level_dimensions[0][0] / out_w

    def _read_level(self, level: int, factor: int, out_h: int, out_w: int) -> np.ndarray:
        """Read ``level`` in bounded blocks, block-averaged by ``factor``, so the full level is never in memory."""
        ds = self.level_downsamples[level]
        out = np.empty((out_h, out_w, 3), np.uint8)
        side = max(1, _READ_BLOCK_PX // factor) * factor
        for y0 in range(0, out_h * factor, side):
            rows = min(side, out_h * factor - y0)
            for x0 in range(0, out_w * factor, side):
                cols = min(side, out_w * factor - x0)
                region = self.read_region(int(round(x0 * ds)), int(round(y0 * ds)), cols, rows, level)
                if factor > 1:
                    region = region.reshape(rows // factor, factor, cols // factor, factor, 3).mean(
                        axis=(1, 3), dtype=np.float32)
                    region = np.clip(region + 0.5, 0, 255).astype(np.uint8)
                out[y0 // factor:(y0 + rows) // factor, x0 // factor:(x0 + cols) // factor] = region
        return out

    def close(self) -> None:
        self._thumbnail_memo = None
        if getattr(self, "_closed", False):  # a second close (slide and patch source share it) would fail in OpenSlide
            return
        self._closed = True
        close = getattr(self.handle, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self.mpp})")


def _stat_failure(path: Path, error: OSError) -> str:
    """Why ``path`` cannot be opened, naming symlink loops and broken symlinks rather than 'file not found'."""
    if error.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if error.errno == errno.ENOENT and path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"broken symlink: it points to {target!r}, which does not exist"
    if error.errno == errno.ENOENT:
        return "file not found"
    if error.errno == errno.EACCES:
        return "permission denied"
    return f"cannot be opened ({error.strerror or error})"


def _try_backend(path: Path, backend: str, mpp: float | None) -> Slide:
    reader = _make_reader(backend)
    handle = reader.read(str(path))
    slide = Slide(path, backend, reader, handle, mpp=mpp)
    # probe: decode a small region in the middle of the coarsest level (catches unsupported codecs, e.g. JPEG 2000)
    lvl = slide.level_count - 1
    w, h = slide.level_dimensions[lvl]
    ds = slide.level_downsamples[lvl]
    pw, ph = min(64, w), min(64, h)
    x0, y0 = int((w - pw) // 2 * ds), int((h - ph) // 2 * ds)
    probe = slide.read_region(x0, y0, pw, ph, lvl)
    if probe.shape != (ph, pw, 3):
        raise WSIReadError(path, f"{backend} returned a probe region of shape {probe.shape}, expected {(ph, pw, 3)}")
    return slide


def _open_dicom(path: Path, backend: str, mpp: float | None) -> Slide:
    """A DICOM WSI series (a folder, or one of its instance files) through OpenSlide, whatever ``backend`` says
    (cuCIM 23.10 and tiffslide do not read DICOM), with the mpp from the level-0 instance's Pixel Spacing."""
    from monai_wsi_ext.io.dicom import resolve_wsi_series

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"`backend` must be 'auto' or one of {BACKENDS}, got {backend!r}.")
    try:
        series = resolve_wsi_series(path)
    except ConfigError as e:  # pydicom missing: this slide fails, a batch goes on
        raise WSIReadError(path, str(e)) from e
    if not optional_import("openslide")[1]:
        raise WSIReadError(path, "a DICOM WSI is read with OpenSlide >= 4, which is not installed "
                                 "(openslide-python and openslide-bin)")
    if backend not in ("auto", "openslide"):
        logger.info("%s: DICOM WSI read with OpenSlide (backend %r does not read DICOM)", path, backend)
    check_slide_timeout(path, "opening it with openslide")
    try:
        slide = _try_backend(series.level0.path, "openslide", mpp)
    except SlideTimeoutError:
        raise
    except Exception as e:  # noqa: BLE001
        reason = e.reason if isinstance(e, WSIReadError) else f"{type(e).__name__}: {e}"
        raise WSIReadError(path, f"OpenSlide cannot read DICOM WSI series {series.series_uid} "
                                 f"({series.level0.path.name}): {reason}") from e
    slide.path, slide.dicom = path, series
    if tuple(slide.dimensions) != tuple(series.dimensions):
        slide.close()
        raise WSIReadError(path, f"OpenSlide reads level 0 as {slide.dimensions} px but the DICOM total pixel matrix "
                                 f"of {series.level0.path.name} is {series.dimensions}")
    if mpp is None and series.mpp_xy is not None:
        dicom_mpp = (series.mpp_xy[0] + series.mpp_xy[1]) / 2
        if math.isfinite(dicom_mpp) and 0 < dicom_mpp < 1000:
            if slide.mpp is not None and abs(slide.mpp - dicom_mpp) > 1e-6 * dicom_mpp:
                slide.warnings.append(f"OpenSlide reports {slide.mpp} µm/px, the DICOM Pixel Spacing "
                                      f"{dicom_mpp} µm/px; the Pixel Spacing is used")
            slide.warnings = [w for w in slide.warnings if not w.startswith("no mpp")]
            slide.mpp, slide.mpp_source = dicom_mpp, "file"
    logger.debug("%s: DICOM WSI series %s, level 0 %s, read with OpenSlide", path, series.series_uid,
                 series.level0.path.name)
    return slide


def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    A DICOM WSI (a folder holding one slide's series, or one instance file of it; see :mod:`monai_wsi_ext.io.dicom`)
    is always read with OpenSlide (cuCIM 23.10 and tiffslide do not read DICOM; another ``backend`` is logged and
    not used), its mpp taken from the level-0 instance's Pixel Spacing; the open slide's ``dicom`` is the series.

    Args:
        path: the slide file (SVS, pyramidal or flat TIFF, anything the backends support), or a DICOM WSI folder or
            instance file.
        backend: ``auto`` (cuCIM, else OpenSlide, else tiffslide — the first that opens the file and decodes a
            probe region) or a backend name to force one.
        mpp: level-0 microns per pixel, overriding the file's (needed for files without resolution metadata).

    Raises:
        WSIReadError: the file is missing (a broken symlink or a symlink loop is named as such), truncated or
            corrupt (including a header that declares more image than the file holds), or no backend can read it;
            the message names the file and each backend's reason. :class:`SlideTimeoutError` when an active
            :func:`slide_timeout` runs out.
        ConfigError: ``mpp`` is not a positive number.
    """
    path = Path(path)
    mpp = validate_mpp(mpp)
    try:
        st = path.stat()
    except OSError as e:
        raise WSIReadError(path, _stat_failure(path, e)) from None
    if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and is_dicom_file(path)):
        if stat.S_ISDIR(st.st_mode) and not is_dicom_slide(path):
            raise WSIReadError(path, "not a file (a folder, and it holds no DICOM files of a DICOM slide)")
        return _open_dicom(path, backend, mpp)
    if not stat.S_ISREG(st.st_mode):
        raise WSIReadError(path, "not a file")
    if st.st_size == 0:
        raise WSIReadError(path, "empty file")
    if path.suffix.lower() in (".tif", ".tiff", ".svs", ".btf", ".tf8"):
        _check_tiff_integrity(path)
    candidates = available_backends() if backend == "auto" else [backend]
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"`backend` must be 'auto' or one of {BACKENDS}, got {backend!r}.")
    if not candidates:
        raise WSIReadError(path, f"none of the slide readers {BACKENDS} is installed")
    reasons = []
    for name in candidates:
        if not optional_import(name)[1]:
            reasons.append(f"{name}: not installed")
            continue
        check_slide_timeout(path, f"opening it with {name}")
        try:
            slide = _try_backend(path, name, mpp)
        except SlideTimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - each backend fails in its own way
            reason = e.reason if isinstance(e, WSIReadError) else f"{type(e).__name__}: {e}"
            reasons.append(f"{name}: {reason}")
            logger.info("%s: backend %s cannot read it (%s)", path, name, reason)
            continue
        if reasons:
            logger.warning("%s: using backend %s after %s", path, name, "; ".join(reasons))
        else:
            logger.debug("%s: using backend %s", path, name)
        return slide
    raise WSIReadError(path, "no backend can read this file: " + "; ".join(reasons))


class SlideReader:
    """The slide reader as a config component: opens slides with one backend choice and mpp override.

    ``bundle/configs`` declare it (``"reader": {"_target_": "monai_wsi_ext.io.wsi.SlideReader", "backend":
    "cucim"}``) and pass it to the datasets, so a user swaps the backend by editing JSON. ``auto`` tries cuCIM, then
    OpenSlide, then tiffslide (see :func:`open_slide`).

    Args:
        backend: ``auto``, ``cucim``, ``openslide`` or ``tiffslide``.
        mpp: level-0 mpp to use instead of the file's (None: the file's own).
    """

    def __init__(self, backend: str = "auto", mpp: float | None = None):
        self.backend, self.mpp = backend, mpp

    def open(self, path: str | os.PathLike, mpp: float | None = None) -> Slide:
        """Open one slide (``mpp`` overrides the reader's own override for this slide)."""
        return open_slide(path, backend=self.backend, mpp=mpp if mpp is not None else self.mpp)

    def __repr__(self) -> str:
        return f"SlideReader(backend={self.backend!r}, mpp={self.mpp!r})"
