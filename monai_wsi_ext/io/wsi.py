"""Slide reading built on MONAI's WSI readers, with a backend choice that falls back cleanly.

``open_slide(path, backend="auto")`` tries cuCIM, then OpenSlide, then tiffslide (a tifffile-based reader that
decodes only the tiles it needs). A backend is accepted only when it opens the file *and* decodes a probe region,
so a JPEG 2000 slide a backend cannot decode falls through to the next one. The choice is logged.

MONAI's own ``tifffile`` backend decodes a whole level for every patch and is never used here.

Coordinates: ``(x, y)`` are level-0 pixel coordinates; sizes are ``(width, height)`` at the read level; arrays
are ``(height, width, 3)`` uint8 RGB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from monai.data import CuCIMWSIReader, OpenSlideWSIReader
from monai.utils import optional_import

from monai_wsi_ext.errors import WSIReadError

__all__ = ["BACKENDS", "Slide", "TiffSlideWSIReader", "open_slide", "available_backends"]

logger = logging.getLogger(__name__)

BACKENDS = ("cucim", "openslide", "tiffslide")


# Batches per native cuCIM call in ``Slide.read_regions``: enough for cuCIM to pipeline decoding, few enough that
# a reader stopped early finishes the outstanding span quickly.
_CUCIM_SPAN_BATCHES = 8


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
    return [b for b in BACKENDS if optional_import(names[b])[1]]


def _make_reader(backend: str):
    if backend == "cucim":
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
    except WSIReadError:
        raise
    except tifffile.TiffFileError as e:
        raise WSIReadError(path, f"not a readable TIFF ({e})") from e
    except Exception as e:  # noqa: BLE001 - corrupt headers raise many kinds of errors
        raise WSIReadError(path, f"corrupt TIFF structure ({type(e).__name__}: {e})") from e


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
    """

    def __init__(self, path: Path, backend: str, reader, handle, mpp: float | None = None):
        self.path = Path(path)
        self.backend = backend
        self.reader = reader
        self.handle = handle
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
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "user"
        else:
            file_mpp = self._file_mpp()
            if file_mpp is not None:
                self.mpp, self.mpp_source = file_mpp, "file"

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
                yield from self._cucim_batches(locs[start:start + span], (w, h), int(level), num_workers,
                                               int(batch_size), copy)
            return
        with ThreadPoolExecutor(max_workers=max(int(num_workers), 1)) as pool:
            for start in range(0, len(locs), batch_size):
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

    def thumbnail(self, max_size: int = 2048, level: int | None = None) -> tuple[np.ndarray, float]:
        """A low-resolution RGB image of the whole slide and its downsample relative to level 0.

        Args:
            max_size: upper bound of the thumbnail's longer side when ``level`` is not given: the coarsest level
                is read and, if still larger, reduced by block averaging in strips (never a full-level array
                for single-level slides that are larger than ``4 * max_size``).
            level: read this level as is instead.

        Returns:
            ``(image, downsample)`` where ``downsample`` is level-0 width over the image width.
        """
        if level is None:
            fits = [i for i, (w, h) in enumerate(self.level_dimensions) if max(w, h) <= max_size]
            level = min(fits) if fits else self.level_count - 1
        level = int(level)
        w, h = self.level_dimensions[level]
        factor = 1
        if max(w, h) > max_size and level == self.level_count - 1:
            factor = int(np.ceil(max(w, h) / max_size))
        if factor == 1:
            img = self.read_region(0, 0, w, h, level)
        else:
            img = self._reduced_level(level, factor)
        return img, self.level_dimensions[0][0] / img.shape[1]

    def _reduced_level(self, level: int, factor: int) -> np.ndarray:
        """Read ``level`` in strips and block-average by ``factor`` so that the full level is never in memory."""
        w, h = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        out_w, out_h = w // factor, h // factor
        out = np.empty((out_h, out_w, 3), np.uint8)
        strip = max(1, 2048 // factor) * factor
        for y0 in range(0, out_h * factor, strip):
            rows = min(strip, out_h * factor - y0)
            region = self.read_region(0, int(y0 * ds), out_w * factor, rows, level).astype(np.float32)
            region = region.reshape(rows // factor, factor, out_w, factor, 3).mean(axis=(1, 3))
            out[y0 // factor:(y0 + rows) // factor] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return out

    def close(self) -> None:
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


def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: the slide file (SVS, pyramidal or flat TIFF, anything the backends support).
        backend: ``auto`` (cuCIM, else OpenSlide, else tiffslide — the first that opens the file and decodes a
            probe region) or a backend name to force one.
        mpp: level-0 microns per pixel, overriding the file's (needed for files without resolution metadata).

    Raises:
        WSIReadError: the file is missing, truncated or corrupt, or no backend can read it; the message names the
            file and each backend's reason.
    """
    path = Path(path)
    if not path.exists():
        raise WSIReadError(path, "file not found")
    if not path.is_file():
        raise WSIReadError(path, "not a file")
    if path.stat().st_size == 0:
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
        try:
            slide = _try_backend(path, name, mpp)
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
