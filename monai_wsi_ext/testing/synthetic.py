"""Synthetic H&E-like whole-slide images with exact tumor ground truth, for demos and tests.

Each slide is a pyramidal, tiled, JPEG-compressed TIFF (one top-level page per level, resolution tags in pixels
per centimetre) that cuCIM, OpenSlide, tiffslide and tifffile all open. The image is rendered procedurally from a
small model in level-0 coordinates:

* tissue: a few irregular lumps (smooth star-shaped blobs) on a near-white, noisy background;
* stroma: pink (eosin) fibrous texture with sparse small purple (hematoxylin) nuclei, partly elongated
  fibroblast-like and partly round, dark lymphocyte-like, with a smoothly varying local density and some dense
  lymphocyte aggregates (so that darkness alone does not mean tumor);
* tumor: smooth blobs kept inside the lumps, rendered with larger, denser, darker, irregular nuclei with
  darker rims on a paler cytoplasm;
* per-slide stain variation: the hematoxylin and eosin optical-density vectors and strengths are jittered.

Two knobs make whole-slide context matter, as in Takahama et al. (ICCV 2019). Both refer to a grid of
``patch_size`` level-0 pixel cells aligned at ``(0, 0)``:

* ``normal_looking_tumor_fraction``: that fraction of the grid cells whose centre lies in a tumor region is
  rendered with normal appearance; their ground truth stays tumor.
* ``tumor_points``: that many isolated, roughly cell-sized tumor-looking spots are placed in normal tissue,
  away from the tumor regions; their ground truth is normal (they are not in the annotations).

Next to ``<name>.tif`` the generator writes ``<name>.xml`` (ASAP, Camelyon16 layout, tumor group ``_0``),
``<name>.geojson`` (QuPath) and ``<name>_truth.npz`` with boolean masks at ``truth_downsample``:

* ``tissue``, ``tumor`` (the annotation), ``tumor_looking`` (where tumor appearance was rendered), each of shape
  ``(ceil(height / downsample), ceil(width / downsample))``, sampled at the centres of the mask pixels;
* ``downsample`` (int), ``patch_size`` (int), ``normal_looking_cells`` (``(K, 2)`` int rows of grid
  ``(row, col)``), ``tumor_point_centers`` (``(P, 2)`` float ``(x, y)`` level-0), ``n_tumor_polygons``, ``seed``
  and ``config_json``.

Lumps, tumors, stains and textures depend only on the seed (and size); the knobs draw from a separate random
stream, so turning a knob off changes only the pixels in and around the cells it concerns.

Large slides are written tile by tile: level 0 is rendered per tile, and each coarser level is built from 2x2
means of the level above, streamed through a raw temporary file band by band, so peak memory grows with the
slide width, not its area. Everything is deterministic: the same seed and configuration give byte-identical
files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.io.annotations import AnnotationLabel, AnnotationPolygon, write_asap_xml, write_qupath_geojson
from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import atomic_path, write_json_atomic

__all__ = [
    "SyntheticSlideConfig",
    "generate_slide",
    "generate_dataset",
    "pyramid_shapes",
    "sidecar_paths",
]

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test")
_MASK32 = np.uint64(0xFFFFFFFF)
# Macenko's reference H&E optical-density vectors (R, G, B)
_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])
_NUCLEI_BLOCK = 128  # level-0 block size: nuclei of a block come from a generator seeded by (seed, block)


@dataclass
class SyntheticSlideConfig:
    """Settings of one synthetic slide.

    Args:
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        mpp: microns per pixel at level 0 (written in the TIFF resolution tags).
        tile_size: TIFF tile side (a multiple of 16).
        patch_size: side of the level-0 patch grid cells (aligned at ``(0, 0)``) the two knobs refer to.
        n_lumps: number of tissue lumps.
        tumor_regions: number of tumor polygons (0 gives a tumor-free slide).
        normal_looking_tumor_fraction: fraction of the grid cells whose centre is in a tumor region that are
            rendered with normal appearance; their ground truth stays tumor.
        tumor_points: number of isolated, about cell-sized tumor-looking spots placed in normal tissue; their
            ground truth is normal. Fewer are placed (with a warning) when the tissue has no room.
        jpeg_quality: JPEG quality of the tiles (1-100).
        nucleus_radius: ``(min, max)`` semi-major axis of normal nuclei, in level-0 pixels.
        tumor_nucleus_radius: ``(min, max)`` semi-major axis of tumor nuclei, in level-0 pixels.
        nuclei_density: mean density of normal nuclei per level-0 pixel (varies locally by 0.5x-2x).
        tumor_nuclei_density: density of tumor nuclei per level-0 pixel.
        aggregate_density: peak density of the lymphocyte aggregates in normal tissue (dense patches of small,
            dark, round nuclei; 0 turns them off). They make normal tissue locally as dark as tumor, so that
            nucleus size and shape, not only mean colour, tell the classes apart.
        stain_jitter: standard deviation of the per-slide jitter of the stain vectors and strengths.
        truth_downsample: downsample of the masks in the ``_truth.npz`` file.
        max_top_level_size: pyramid levels are added until the smallest side is at most this.
        min_levels: minimum number of pyramid levels.
    """

    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    tile_size: int = 256
    patch_size: int = 256
    n_lumps: int = 3
    tumor_regions: int = 2
    normal_looking_tumor_fraction: float = 0.1
    tumor_points: int = 4
    jpeg_quality: int = 85
    nucleus_radius: tuple[float, float] = (3.0, 6.0)
    tumor_nucleus_radius: tuple[float, float] = (6.0, 10.0)
    nuclei_density: float = 1.0e-3
    tumor_nuclei_density: float = 2.0e-3
    aggregate_density: float = 5.0e-3
    stain_jitter: float = 0.05
    truth_downsample: int = 16
    max_top_level_size: int = 1024
    min_levels: int = 3

    def __post_init__(self):
        self.nucleus_radius = tuple(float(v) for v in self.nucleus_radius)
        self.tumor_nucleus_radius = tuple(float(v) for v in self.tumor_nucleus_radius)
        self.validate()

    def validate(self) -> None:
        """Check ranges and consistency.

        Raises:
            ConfigError: naming the offending field, its value and the allowed range.
        """
        ints = {"width": 64, "height": 64, "tile_size": 16, "patch_size": 8, "n_lumps": 1, "tumor_regions": 0,
                "tumor_points": 0, "truth_downsample": 1, "max_top_level_size": 16, "min_levels": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"SyntheticSlideConfig.{name} must be an integer >= {low}, got {value!r}.")
        if self.tile_size % 16:
            raise ConfigError(f"SyntheticSlideConfig.tile_size must be a multiple of 16 (TIFF), got {self.tile_size}.")
        if not 0.0 <= self.normal_looking_tumor_fraction <= 1.0:
            raise ConfigError("SyntheticSlideConfig.normal_looking_tumor_fraction must be in [0, 1], got "
                              f"{self.normal_looking_tumor_fraction!r}.")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"SyntheticSlideConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality!r}.")
        if not self.mpp > 0:
            raise ConfigError(f"SyntheticSlideConfig.mpp must be > 0, got {self.mpp!r}.")
        for name in ("nucleus_radius", "tumor_nucleus_radius"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1.0 <= lo_hi[0] <= lo_hi[1] <= 64.0:
                raise ConfigError(f"SyntheticSlideConfig.{name} must be (min, max) with 1 <= min <= max <= 64, "
                                  f"got {lo_hi!r}.")
        for name in ("nuclei_density", "tumor_nuclei_density", "aggregate_density"):
            low = 0.0 if name == "aggregate_density" else 1e-9
            if not low <= getattr(self, name) <= 0.02:
                raise ConfigError(f"SyntheticSlideConfig.{name} must be in [{low:g}, 0.02] nuclei per pixel, got "
                                  f"{getattr(self, name)!r}.")
        if not 0.0 <= self.stain_jitter <= 0.3:
            raise ConfigError(f"SyntheticSlideConfig.stain_jitter must be in [0, 0.3], got {self.stain_jitter!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-friendly dictionary (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def pyramid_shapes(
    width: int, height: int, max_top_level_size: int = 1024, min_levels: int = 3
) -> list[tuple[int, int]]:
    """Level shapes ``(height, width)`` of the pyramid: each level halves the previous one (rounding up).

    Levels are added until the smallest side is at most ``max_top_level_size``, with at least ``min_levels``.
    """
    shapes = [(int(height), int(width))]
    while len(shapes) < min_levels or min(shapes[-1]) > max_top_level_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def sidecar_paths(path: str | os.PathLike) -> dict[str, Path]:
    """Paths of the files written for slide ``path``: ``image``, ``asap_xml``, ``geojson`` and ``truth``."""
    path = Path(path)
    stem = path.with_suffix("")
    return {"image": path, "asap_xml": stem.with_suffix(".xml"), "geojson": stem.with_suffix(".geojson"),
            "truth": stem.parent / f"{stem.name}_truth.npz"}


# ---------------------------------------------------------------------------------------------------------------
# procedural primitives
# ---------------------------------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic pseudo-random float32 in [0, 1) per integer lattice point (integer mixing, no state)."""
    h = (np.asarray(ix).astype(np.uint64) * np.uint64(0x9E3779B1)
         + np.asarray(iy).astype(np.uint64) * np.uint64(0x85EBCA77) + np.uint64(salt & 0xFFFFFFFF)) & _MASK32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & _MASK32
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & _MASK32
    h ^= h >> np.uint64(15)
    return (h >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _noise_points(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] at arbitrary level-0 points (smoothstep-bilinear between hashed lattice values)."""
    gx, gy = np.asarray(x, dtype=np.float64) / scale, np.asarray(y, dtype=np.float64) / scale
    ix, iy = np.floor(gx), np.floor(gy)
    sx, sy = _smooth(gx - ix).astype(np.float32), _smooth(gy - iy).astype(np.float32)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    top = _hash01(ix, iy, salt) * (1 - sx) + _hash01(ix + 1, iy, salt) * sx
    bottom = _hash01(ix, iy + 1, salt) * (1 - sx) + _hash01(ix + 1, iy + 1, salt) * sx
    return top * (1 - sy) + bottom * sy


def _lattice_weights(coords: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = coords / scale
    i0 = np.floor(g).astype(np.int64)
    return i0, _smooth(g - i0).astype(np.float32), np.arange(i0.min(), i0.max() + 2)


def _noise_grid(xs: np.ndarray, ys: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """The same value noise as :func:`_noise_points` on the grid ``ys x xs`` (separable, no BLAS)."""
    ix, sx, lx = _lattice_weights(xs, scale)
    iy, sy, ly = _lattice_weights(ys, scale)
    lattice = _hash01(lx[None, :], ly[:, None], salt)
    ry, rx = iy - ly[0], ix - lx[0]
    rows = lattice[ry] * (1 - sy)[:, None] + lattice[ry + 1] * sy[:, None]  # (len(ys), len(lx))
    return rows[:, rx] * (1 - sx)[None, :] + rows[:, rx + 1] * sx[None, :]


@dataclass
class _Blob:
    """Star-shaped smooth blob: radius ``r0 * (1 + Re(sum_k c_k e^{ik theta}))`` around ``(cx, cy)``."""

    cx: float
    cy: float
    r0: float
    coeffs: np.ndarray  # complex coefficients for harmonics k = 2 .. 2 + len - 1

    @staticmethod
    def random(rng: np.random.Generator, cx: float, cy: float, r0: float, n_harmonics: int, roughness: float) -> _Blob:
        amps = rng.uniform(0.3, 1.0, n_harmonics) / np.arange(2, 2 + n_harmonics) ** 0.9
        amps *= roughness / amps.sum()
        phases = rng.uniform(0, 2 * np.pi, n_harmonics)
        return _Blob(float(cx), float(cy), float(r0), amps * np.exp(1j * phases))

    @property
    def r_max(self) -> float:
        return self.r0 * (1 + float(np.abs(self.coeffs).sum()))

    @property
    def r_min(self) -> float:
        return self.r0 * (1 - float(np.abs(self.coeffs).sum()))

    def radius_at(self, z: np.ndarray) -> np.ndarray:
        """Boundary radius in the directions given by unit complex numbers ``z``."""
        acc = np.zeros_like(z)
        for c in self.coeffs[::-1]:  # Horner: sum_k c_k z^k for k = 2 .. K
            acc += z.dtype.type(c)
            acc *= z
        acc *= z
        return acc.real.dtype.type(self.r0) * (1 + acc.real)

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boundary radius minus distance from the centre (> 0 inside), in pixels; ``x``/``y`` broadcast."""
        dx = (np.asarray(x, dtype=np.float64) - self.cx).astype(np.float32)
        dy = (np.asarray(y, dtype=np.float64) - self.cy).astype(np.float32)
        dx, dy = np.broadcast_arrays(dx, dy)
        r = np.hypot(dx, dy)
        inv = 1 / np.maximum(r, np.float32(1e-6))
        z = np.empty(r.shape, dtype=np.complex64)
        z.real = dx * inv
        z.imag = dy * inv
        return self.radius_at(z) - r

    def polygon(self, n: int | None = None) -> np.ndarray:
        """Boundary vertices ``(n, 2)`` as ``(x, y)`` in order of increasing angle (no repeated first vertex)."""
        if n is None:
            n = int(np.clip(self.r0 / 4, 64, 720))
        theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
        z = np.exp(1j * theta)
        r = self.radius_at(z)
        return np.stack([self.cx + r * z.real, self.cy + r * z.imag], axis=1)

    def bbox_hits(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        rm = self.r_max
        return not (x1 < self.cx - rm or x0 > self.cx + rm or y1 < self.cy - rm or y0 > self.cy + rm)


def _max_depth(blobs: list[_Blob], x: np.ndarray, y: np.ndarray, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Pointwise maximum of the blobs' depths (``-1e9`` where none is near).

    Where the whole ``bbox`` lies well inside a blob, its depth is replaced by a positive lower bound (callers
    only threshold or clip depths near the boundary), which saves the exact evaluation inside large lumps.
    """
    shape = np.broadcast_shapes(np.shape(x), np.shape(y))
    out = np.full(shape, -1e9, dtype=np.float32)
    x0, y0, x1, y1 = bbox
    for blob in blobs:
        if blob.bbox_hits(*bbox):
            far = math.hypot(max(abs(x0 - blob.cx), abs(x1 - blob.cx)), max(abs(y0 - blob.cy), abs(y1 - blob.cy)))
            if far < blob.r_min - 16.0:
                np.maximum(out, blob.r_min - far, out=out)
            else:
                np.maximum(out, blob.depth(x, y), out=out)
    return out


def _bbox(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    if np.size(x) == 0 or np.size(y) == 0:
        return (0.0, 0.0, -1.0, -1.0)
    return float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y))


# ---------------------------------------------------------------------------------------------------------------
# slide model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _SlideModel:
    seed: int
    cfg: SyntheticSlideConfig
    lumps: list[_Blob]
    tumors: list[_Blob]
    spots: list[_Blob]  # tumor-looking points (ground truth normal)
    normal_looking: np.ndarray  # (grid_h, grid_w) bool: cells rendered normal inside tumor
    h_od: np.ndarray
    e_od: np.ndarray
    background: np.ndarray  # background optical density (3,)
    fiber_angle: float
    salts: dict[str, int] = field(default_factory=dict)

    # -- pointwise queries (level-0 coordinates, broadcastable arrays) --
    def tissue_depth(self, x, y) -> np.ndarray:
        return _max_depth(self.lumps, x, y, _bbox(x, y))

    def tumor_depth(self, x, y) -> np.ndarray:
        return _max_depth(self.tumors, x, y, _bbox(x, y))

    def spot_depth(self, x, y) -> np.ndarray:
        return _max_depth(self.spots, x, y, _bbox(x, y))

    def normal_looking_at(self, x, y) -> np.ndarray:
        gh, gw = self.normal_looking.shape
        col = np.clip(np.floor(np.asarray(x) / self.cfg.patch_size).astype(np.int64), 0, gw - 1)
        row = np.clip(np.floor(np.asarray(y) / self.cfg.patch_size).astype(np.int64), 0, gh - 1)
        return self.normal_looking[row, col]

    def tumor_looking(self, x, y) -> np.ndarray:
        return ((self.tumor_depth(x, y) > 0) & ~self.normal_looking_at(x, y)) | (self.spot_depth(x, y) > 0)


def _place_lumps(rng: np.random.Generator, cfg: SyntheticSlideConfig) -> list[_Blob]:
    w, h, n = cfg.width, cfg.height, cfg.n_lumps
    margin = 0.04 * min(w, h)
    base = math.sqrt(0.38 * w * h / (n * math.pi))
    lumps: list[_Blob] = []
    for _ in range(n):
        r0 = min(base * rng.uniform(0.8, 1.15), (min(w, h) / 2 - margin) / 1.35)
        best, best_score = None, -np.inf
        for _ in range(60):
            blob = _Blob.random(rng, 0.0, 0.0, r0, n_harmonics=6, roughness=0.3)
            rm = blob.r_max
            lo_x, hi_x, lo_y, hi_y = rm + margin, w - rm - margin, rm + margin, h - rm - margin
            blob.cx = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else w / 2
            blob.cy = float(rng.uniform(lo_y, hi_y)) if hi_y > lo_y else h / 2
            score = min((math.hypot(blob.cx - o.cx, blob.cy - o.cy) - 0.85 * (blob.r0 + o.r0) for o in lumps),
                        default=0.0)
            if score > best_score:
                best, best_score = blob, score
            if score >= 0:
                break
        lumps.append(best)
    return lumps


def _place_tumors(rng: np.random.Generator, cfg: SyntheticSlideConfig, lumps: list[_Blob]) -> list[_Blob]:
    tumors: list[_Blob] = []
    order = rng.permutation(len(lumps))
    for t in range(cfg.tumor_regions):
        lump = lumps[order[t % len(lumps)]]
        r0 = lump.r0 * rng.uniform(0.35, 0.6) / (1 + 0.3 * (cfg.tumor_regions > len(lumps)))
        margin = max(0.05 * lump.r0, 8.0)
        placed = None
        for attempt in range(200):
            if attempt and attempt % 25 == 0:
                r0 *= 0.85
            blob = _Blob.random(rng, 0.0, 0.0, r0, n_harmonics=5, roughness=0.25)
            ang, rad = rng.uniform(0, 2 * np.pi), lump.r_min * math.sqrt(rng.uniform(0, 1)) * 0.8
            blob.cx, blob.cy = lump.cx + rad * math.cos(ang), lump.cy + rad * math.sin(ang)
            poly = blob.polygon()
            if np.min(lump.depth(poly[:, 0], poly[:, 1])) < margin:
                continue
            if any(math.hypot(blob.cx - o.cx, blob.cy - o.cy) < blob.r_max + o.r_max + margin for o in tumors):
                continue
            placed = blob
            break
        if placed is None:
            logger.warning("Synthetic slide: could not place tumor region %d inside the tissue; skipped.", t)
            continue
        tumors.append(placed)
    return tumors


def _cell_samples(cfg: SyntheticSlideConfig, n: int = 5) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    ps = cfg.patch_size
    gh, gw = -(-cfg.height // ps), -(-cfg.width // ps)
    offs = (np.arange(n) + 0.5) / n * ps
    ys = (np.arange(gh)[:, None, None, None] * ps + offs[None, None, :, None])
    xs = (np.arange(gw)[None, :, None, None] * ps + offs[None, None, None, :])
    return xs, ys, (gh, gw)


def _place_knobs(rng: np.random.Generator, cfg: SyntheticSlideConfig, lumps: list[_Blob],
                 tumors: list[_Blob]) -> tuple[np.ndarray, list[_Blob]]:
    ps = cfg.patch_size
    xs, ys, (gh, gw) = _cell_samples(cfg)
    cx = (np.arange(gw) + 0.5) * ps
    cy = (np.arange(gh) + 0.5) * ps
    # normal-looking cells: a fraction of the cells whose centre is in a tumor region
    centre_in_tumor = _max_depth(tumors, cx[None, :], cy[:, None], (0, 0, cfg.width, cfg.height)) > 0
    candidates = np.flatnonzero(centre_in_tumor)
    normal_looking = np.zeros((gh, gw), dtype=bool)
    k = int(round(cfg.normal_looking_tumor_fraction * candidates.size))
    if k:
        normal_looking.flat[np.sort(rng.choice(candidates, size=k, replace=False))] = True
    # tumor points: cells inside tissue, not touching a tumor cell nor its neighbours, not adjacent to each other
    spots: list[_Blob] = []
    if cfg.tumor_points:
        from scipy.ndimage import binary_dilation

        box = (0, 0, cfg.width, cfg.height)
        tissue_depth = np.empty((gh, gw, 5, 5))
        tumor_any = np.empty((gh, gw), dtype=bool)
        for r in range(gh):  # row by row keeps memory small on very large slides
            tissue_depth[r] = _max_depth(lumps, xs[0], ys[r], box)
            tumor_any[r] = (_max_depth(tumors, xs[0], ys[r], box) > -ps * 0.25).any(axis=(-2, -1))
        inside = (tissue_depth > 0.05 * ps).all(axis=(-2, -1))
        inside &= (np.arange(gw)[None, :] + 1) * ps <= cfg.width
        inside &= (np.arange(gh)[:, None] + 1) * ps <= cfg.height
        blocked = binary_dilation(tumor_any, structure=np.ones((3, 3), bool), iterations=1)
        free = inside & ~blocked
        for idx in rng.permutation(np.flatnonzero(free)):
            if len(spots) >= cfg.tumor_points:
                break
            r, c = divmod(int(idx), gw)
            if not free[r, c]:
                continue
            spot = _Blob.random(rng, (c + 0.5) * ps, (r + 0.5) * ps, ps * rng.uniform(0.33, 0.42), 3, 0.18)
            spots.append(spot)
            free[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2] = False
        if len(spots) < cfg.tumor_points:
            logger.warning("Synthetic slide: room for only %d of %d tumor points.", len(spots), cfg.tumor_points)
    return normal_looking, spots


def _build_model(seed: int, cfg: SyntheticSlideConfig) -> _SlideModel:
    """Draw the slide's random layout: stains, textures, lumps and tumors, then (from their own stream) knobs."""
    rng = _rng(seed, 0x5EED)
    j = cfg.stain_jitter
    h_od = _H_OD + rng.normal(0, j, 3)
    e_od = _E_OD + rng.normal(0, j, 3)
    h_od = np.clip(h_od, 0.05, None) / np.linalg.norm(np.clip(h_od, 0.05, None)) * rng.uniform(1 - 2 * j, 1 + 2 * j)
    e_od = np.clip(e_od, 0.05, None) / np.linalg.norm(np.clip(e_od, 0.05, None)) * rng.uniform(1 - 2 * j, 1 + 2 * j)
    background = np.clip(rng.uniform(0.02, 0.06) + rng.normal(0, 0.008, 3), 0.005, None)
    names = ("density", "lymph", "stroma", "warp", "texture", "pale", "aggregate")
    salts = {name: int(v) for name, v in zip(names, rng.integers(0, 2**32, len(names)))}
    fiber_angle = float(rng.uniform(0, np.pi))
    lumps = _place_lumps(rng, cfg)
    tumors = _place_tumors(rng, cfg, lumps)
    # the knobs draw from a separate stream: changing them changes only the cells they concern
    normal_looking, spots = _place_knobs(_rng(seed, 0x5EED, 1), cfg, lumps, tumors)
    return _SlideModel(seed=seed, cfg=cfg, lumps=lumps, tumors=tumors, spots=spots, normal_looking=normal_looking,
                       h_od=h_od.astype(np.float32), e_od=e_od.astype(np.float32),
                       background=background.astype(np.float32), fiber_angle=fiber_angle, salts=salts)


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------


class _Renderer:
    """Renders level-0 tiles of a :class:`_SlideModel`; nuclei come from per-block generators (cached by row)."""

    def __init__(self, model: _SlideModel):
        self.m = model
        cfg = model.cfg
        self.r_max = max(cfg.nucleus_radius[1], cfg.tumor_nucleus_radius[1])
        self.margin = int(math.ceil(self.r_max * 1.35)) + 2
        self.d_max = max(2.0 * cfg.nuclei_density + cfg.aggregate_density, cfg.tumor_nuclei_density)
        self._blocks: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._background_rgb = (255.0 * np.exp(-model.background)).astype(np.float32)

    def _block_nuclei(self, bx: int, by: int) -> dict[str, np.ndarray]:
        key = (bx, by)
        if key in self._blocks:
            return self._blocks[key]
        m, cfg, b = self.m, self.m.cfg, _NUCLEI_BLOCK
        rng = _rng(m.seed, 0xB10C, bx, by)
        n = int(rng.poisson(self.d_max * b * b))
        x = bx * b + rng.random(n) * b
        y = by * b + rng.random(n) * b
        u = rng.random((8, n))
        in_tissue = m.tissue_depth(x, y) > 1.0
        tumor = m.tumor_looking(x, y) & in_tissue
        density = 0.5 + 1.5 * _noise_points(x, y, 400.0, m.salts["density"])
        aggregate = np.clip((_noise_points(x, y, 230.0, m.salts["aggregate"]) - 0.62) * 5.0, 0, 1)
        keep = np.where(tumor, u[0] < cfg.tumor_nuclei_density / self.d_max,
                        u[0] < (cfg.nuclei_density * density + cfg.aggregate_density * aggregate) / self.d_max)
        keep &= in_tissue
        p_lymph = 0.15 + 0.6 * _noise_points(x, y, 300.0, m.salts["lymph"])
        lymph = (~tumor) & (u[1] < p_lymph + (1 - p_lymph) * aggregate)
        lo, hi = cfg.nucleus_radius
        tlo, thi = cfg.tumor_nucleus_radius
        radius = np.where(tumor, tlo + (thi - tlo) * u[2], np.where(lymph, lo + 0.35 * (hi - lo) * u[2],
                                                                     lo + 0.4 * (hi - lo) + 0.6 * (hi - lo) * u[2]))
        aspect = np.where(tumor, 0.65 + 0.3 * u[3], np.where(lymph, 0.85 + 0.15 * u[3], 0.3 + 0.25 * u[3]))
        dark = np.where(tumor, 1.15 + 0.3 * u[4], np.where(lymph, 1.05 + 0.2 * u[4], 0.7 + 0.25 * u[4]))
        irregular = np.where(tumor, 0.03 + 0.06 * u[5], 0.02 * u[5])
        out = {"x": x, "y": y, "radius": radius, "aspect": aspect, "dark": dark, "angle": u[6] * np.pi,
               "irregular": irregular, "phase": u[7] * 2 * np.pi, "tumor": tumor}
        self._blocks[key] = {k: v[keep] for k, v in out.items()}
        return self._blocks[key]

    def _nuclei_map(self, x0: int, y0: int, size: int) -> np.ndarray:
        """Nuclear stain map (tile + margin, ``float32``) of the nuclei near the tile."""
        pad, b = self.margin, _NUCLEI_BLOCK
        bx0, bx1 = max((x0 - pad) // b, 0), (x0 + size + pad) // b
        by0, by1 = max((y0 - pad) // b, 0), (y0 + size + pad) // b
        for key in [k for k in self._blocks if k[1] < by0]:
            del self._blocks[key]
        parts = [self._block_nuclei(bx, by) for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]
        nuc = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        sel = ((nuc["x"] >= x0 - pad + 1) & (nuc["x"] < x0 + size + pad - 1)
               & (nuc["y"] >= y0 - pad + 1) & (nuc["y"] < y0 + size + pad - 1))
        buf = np.zeros((size + 2 * pad, size + 2 * pad), dtype=np.float32)
        for group in (sel & ~nuc["tumor"], sel & nuc["tumor"]):
            idx = np.flatnonzero(group)
            for start in range(0, idx.size, 64):  # chunks bound the stamp temporaries
                self._stamp(buf, {k: v[idx[start:start + 64]] for k, v in nuc.items()}, x0 - pad, y0 - pad)
        return buf

    def _stamp(self, buf: np.ndarray, nuc: dict[str, np.ndarray], ox: int, oy: int) -> None:
        """Draw nuclei into ``buf`` (origin ``(ox, oy)`` in level-0) with per-nucleus distance fields on stamps."""
        half = int(math.ceil(float(nuc["radius"].max()) * 1.3)) + 1
        off = np.arange(-half, half + 1, dtype=np.float32)
        fx, fy = np.floor(nuc["x"]).astype(np.int64), np.floor(nuc["y"]).astype(np.int64)
        u = (fx[:, None, None] + off[None, None, :] + 0.5 - nuc["x"][:, None, None]).astype(np.float32)
        v = (fy[:, None, None] + off[None, :, None] + 0.5 - nuc["y"][:, None, None]).astype(np.float32)
        cos = np.cos(nuc["angle"]).astype(np.float32)[:, None, None]
        sin = np.sin(nuc["angle"]).astype(np.float32)[:, None, None]
        a = nuc["radius"].astype(np.float32)[:, None, None]
        bb = a * nuc["aspect"].astype(np.float32)[:, None, None]
        ur, vr = u * cos + v * sin, v * cos - u * sin
        d = np.sqrt((ur / a) ** 2 + (vr / bb) ** 2)
        phi = np.arctan2(vr, ur)
        d = d / (1 + nuc["irregular"].astype(np.float32)[:, None, None]
                 * np.cos(3 * phi + nuc["phase"].astype(np.float32)[:, None, None]))
        inner = (1 - d) * bb  # ~ distance to the boundary in pixels, > 0 inside
        val = np.clip(inner + 0.5, 0, 1)
        rim = np.exp(-((inner - 0.8) / 1.2) ** 2)
        tumor = nuc["tumor"][:, None, None]
        val = val * nuc["dark"].astype(np.float32)[:, None, None] * np.where(tumor, 0.72 + 0.45 * rim, 1.0)
        rows = fy[:, None, None] - oy + off.astype(np.int64)[None, :, None]
        cols = fx[:, None, None] - ox + off.astype(np.int64)[None, None, :]
        ok = (rows >= 0) & (rows < buf.shape[0]) & (cols >= 0) & (cols < buf.shape[1]) & (val > 0)
        np.maximum.at(buf.reshape(-1), (rows * buf.shape[1] + cols)[ok], val[ok])

    def render_tile(self, x0: int, y0: int, size: int) -> np.ndarray:
        """Render the level-0 tile with top-left ``(x0, y0)`` as ``uint8`` ``(size, size, 3)``."""
        m = self.m
        xs = x0 + np.arange(size, dtype=np.float64) + 0.5
        ys = y0 + np.arange(size, dtype=np.float64) + 0.5
        tx, ty = x0 // size, y0 // size
        rng = _rng(m.seed, 0x711E, tx, ty)
        grain = rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(2.5)
        box = (x0, y0, x0 + size, y0 + size)
        if any(b.bbox_hits(*box) for b in m.lumps):
            depth = _max_depth(m.lumps, xs[None, :], ys[:, None], box)
            alpha = np.clip(depth / 4.0 + 0.5, 0, 1).astype(np.float32)
            if alpha.any():
                od = m.background + self._tissue_od(xs, ys, alpha, box, x0, y0, size)
                return np.clip(np.float32(255.0) * np.exp(-od) + grain + 0.5, 0, 255).astype(np.uint8)
        return np.clip(self._background_rgb + grain + 0.5, 0, 255).astype(np.uint8)

    def _tissue_od(self, xs, ys, alpha, box, x0, y0, size) -> np.ndarray:
        m = self.m
        # tumor-looking tint: tumor regions (minus normal-looking cells) and tumor points
        tint = np.zeros((size, size), dtype=np.float32)
        if any(b.bbox_hits(*box) for b in m.tumors):
            t = np.clip(_max_depth(m.tumors, xs[None, :], ys[:, None], box) / 6.0 + 0.5, 0, 1)
            t = t * ~m.normal_looking_at(xs[None, :], ys[:, None])
            tint = np.maximum(tint, t.astype(np.float32))
        if any(b.bbox_hits(*box) for b in m.spots):
            t = np.clip(_max_depth(m.spots, xs[None, :], ys[:, None], box) / 6.0 + 0.5, 0, 1)
            tint = np.maximum(tint, t.astype(np.float32))
        # stroma: wavy collagen fibres, slowly varying strength, pale loose areas
        warp = _noise_grid(xs, ys, 70.0, m.salts["warp"])
        ca, sa = math.cos(m.fiber_angle), math.sin(m.fiber_angle)
        phase = (xs[None, :] * ca + ys[:, None] * sa).astype(np.float32) * np.float32(2 * np.pi / 11.0)
        fibre = (0.5 + 0.5 * np.sin(phase + 14.0 * warp)) ** 2
        strength = _noise_grid(xs, ys, 260.0, m.salts["stroma"])
        texture = _noise_grid(xs, ys, 7.0, m.salts["texture"])
        loose = 0.6 * _noise_grid(xs, ys, 170.0, m.salts["pale"]) + 0.4 * _noise_grid(xs, ys, 53.0, m.salts["pale"] + 1)
        pale = np.clip((loose - 0.68) * 4.0, 0, 0.6)
        c_e = (0.42 + 0.3 * strength) * (0.68 + 0.3 * fibre + 0.15 * texture) * (1 - pale)
        c_h = 0.05 + 0.04 * texture
        # tumor: paler, slightly basophilic cytoplasm
        c_e = c_e * (1 - 0.45 * tint)
        c_h = c_h + 0.07 * tint
        nuclei = self._nuclei_map(x0, y0, size)[self.margin:self.margin + size, self.margin:self.margin + size]
        if nuclei.any():
            chrom = 0.88 + 0.24 * texture
            c_h = c_h + 1.05 * nuclei * chrom
            c_e = c_e * (1 - 0.75 * np.minimum(nuclei, 1))
        c_h, c_e = c_h * alpha, c_e * alpha
        return c_h[..., None] * m.h_od + c_e[..., None] * m.e_od


def _down2(band: np.ndarray) -> np.ndarray:
    """2x2 mean of a ``(2h, 2w, 3)`` uint8 array (rounded)."""
    b = band.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def _write_pyramid(path: Path, model: _SlideModel, renderer=None) -> list[tuple[int, int]]:
    """Write the pyramidal TIFF to ``path`` (already a temporary name) tile by tile.

    ``renderer`` gives the level-0 tiles (``render_tile(x0, y0, size)``); by default this generator's
    ``_Renderer(model)`` (the other slide families pass their own)."""
    import tifffile

    cfg = model.cfg
    size = cfg.tile_size
    shapes = pyramid_shapes(cfg.width, cfg.height, cfg.max_top_level_size, cfg.min_levels)
    renderer = _Renderer(model) if renderer is None else renderer
    fill = np.clip(255.0 * np.exp(-model.background) + 0.5, 0, 255).astype(np.uint8)

    def level0_tiles(sink) -> Iterator[np.ndarray]:
        nty, ntx = -(-shapes[0][0] // size), -(-shapes[0][1] // size)
        half = np.empty((size // 2, ntx * size // 2, 3), dtype=np.uint8)
        for ty in range(nty):
            for tx in range(ntx):
                tile = renderer.render_tile(tx * size, ty * size, size)
                if sink is not None:
                    half[:, tx * size // 2:(tx + 1) * size // 2] = _down2(tile)
                    if tx == ntx - 1:
                        sink.write(half.tobytes())
                yield tile

    def upper_tiles(level: int, source: Path, src_width: int, sink) -> Iterator[np.ndarray]:
        h, w = shapes[level]
        nty, ntx = -(-h // size), -(-w // size)
        row_bytes = src_width * 3
        src_rows = os.path.getsize(source) // row_bytes
        half = np.empty((size // 2, ntx * size // 2, 3), dtype=np.uint8)
        with open(source, "rb") as f:
            for ty in range(nty):
                band = np.empty((size, ntx * size, 3), dtype=np.uint8)
                band[:] = fill
                rows = max(0, min(size, src_rows - ty * size))
                if rows:
                    f.seek(ty * size * row_bytes)
                    data = np.frombuffer(f.read(rows * row_bytes), dtype=np.uint8).reshape(rows, src_width, 3)
                    cols = min(src_width, ntx * size)
                    band[:rows, :cols] = data[:, :cols]
                if sink is not None:
                    for tx in range(ntx):
                        half[:, tx * size // 2:(tx + 1) * size // 2] = _down2(band[:, tx * size:(tx + 1) * size])
                    sink.write(half.tobytes())
                for tx in range(ntx):
                    yield np.ascontiguousarray(band[:, tx * size:(tx + 1) * size])

    with tempfile.TemporaryDirectory(prefix=".synthetic-", dir=path.parent) as tmp, \
            tifffile.TiffWriter(path, bigtiff=True) as tif:
        source, src_width = None, 0
        for level, (h, w) in enumerate(shapes):
            sink_path = Path(tmp) / f"level{level + 1}.raw"
            sink = open(sink_path, "wb") if level + 1 < len(shapes) else None
            try:
                tiles = level0_tiles(sink) if level == 0 else upper_tiles(level, source, src_width, sink)
                tif.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(size, size), compression="jpeg",
                          compressionargs={"level": cfg.jpeg_quality}, photometric="rgb",
                          subfiletype=0 if level == 0 else 1,
                          resolution=(1e4 / cfg.mpp / 2**level, 1e4 / cfg.mpp / 2**level),
                          resolutionunit="CENTIMETER", metadata=None)
            finally:
                if sink is not None:
                    sink.close()
            if source is not None:
                source.unlink()
            source, src_width = sink_path, (-(-w // size)) * size // 2
    return shapes


def _truth_masks(model: _SlideModel) -> dict[str, np.ndarray]:
    cfg = model.cfg
    d = cfg.truth_downsample
    mh, mw = -(-cfg.height // d), -(-cfg.width // d)
    xs = (np.arange(mw) + 0.5) * d
    tissue = np.zeros((mh, mw), dtype=bool)
    tumor = np.zeros((mh, mw), dtype=bool)
    looking = np.zeros((mh, mw), dtype=bool)
    chunk = max(1, 262_144 // mw)
    for r0 in range(0, mh, chunk):
        ys = (np.arange(r0, min(r0 + chunk, mh)) + 0.5) * d
        tissue[r0:r0 + ys.size] = model.tissue_depth(xs[None, :], ys[:, None]) > 0
        tumor[r0:r0 + ys.size] = model.tumor_depth(xs[None, :], ys[:, None]) > 0
        looking[r0:r0 + ys.size] = model.tumor_looking(xs[None, :], ys[:, None])
    looking &= tissue
    return {"tissue": tissue, "tumor": tumor, "tumor_looking": looking}


def _save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so identical inputs give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _config_json(cfg: SyntheticSlideConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def _record(path: Path, seed: int, cfg: SyntheticSlideConfig, truth: dict[str, np.ndarray],
            relative_to: Path) -> dict[str, Any]:
    paths = sidecar_paths(path)
    shapes = pyramid_shapes(cfg.width, cfg.height, cfg.max_top_level_size, cfg.min_levels)
    rel = {k: Path(os.path.relpath(p, relative_to)).as_posix() for k, p in paths.items()}
    tissue = truth["tissue"]
    return {
        "id": path.stem,
        **rel,
        "width": cfg.width,
        "height": cfg.height,
        "mpp": cfg.mpp,
        "levels": len(shapes),
        "tile_size": cfg.tile_size,
        "seed": int(seed),
        "split": None,
        "truth_downsample": cfg.truth_downsample,
        "knobs": cfg.to_dict(),
        "stats": {
            "tumor_polygons": int(truth["n_tumor_polygons"]),
            "normal_looking_cells": int(len(truth["normal_looking_cells"])),
            "tumor_points": int(len(truth["tumor_point_centers"])),
            "tissue_fraction": round(float(tissue.mean()), 4),
            "tumor_fraction_of_tissue": round(float(truth["tumor"].sum() / max(tissue.sum(), 1)), 4),
        },
    }


def generate_slide(path: str | os.PathLike, seed: int, config: SyntheticSlideConfig | None = None,
                   relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write one synthetic slide and its ground truth.

    Writes ``path`` (pyramidal TIFF) and, next to it, ``<stem>.xml`` (ASAP), ``<stem>.geojson`` (QuPath) and
    ``<stem>_truth.npz`` (see the module docstring), each atomically.

    Args:
        path: destination ``.tif``/``.tiff`` file; parent folders are created.
        seed: random seed; the same seed and config give byte-identical files.
        config: slide settings (defaults to :class:`SyntheticSlideConfig()`).
        relative_to: folder the paths in the returned record are relative to (default: the slide's folder).

    Returns:
        The manifest record: ``id``, ``image``, ``asap_xml``, ``geojson``, ``truth`` (relative paths),
        ``width``, ``height``, ``mpp``, ``levels``, ``tile_size``, ``seed``, ``split`` (``None`` here),
        ``truth_downsample``, ``knobs`` (all settings) and ``stats``.

    Raises:
        ConfigError: for a bad path suffix, seed or config.
    """
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(f"generate_slide: `path` must end in .tif or .tiff, got {str(path)!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"generate_slide: `seed` must be a non-negative integer, got {seed!r}.")
    cfg = config if config is not None else SyntheticSlideConfig()
    cfg.validate()
    start = time.perf_counter()
    model = _build_model(int(seed), cfg)
    paths = sidecar_paths(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _write_pyramid(tmp, model)
    polygons = [AnnotationPolygon(exterior=np.round(t.polygon(), 2), label=AnnotationLabel.TUMOR,
                                  name=f"Tumor {i}", group="_0") for i, t in enumerate(model.tumors)]
    write_asap_xml(paths["asap_xml"], polygons)
    write_qupath_geojson(paths["geojson"], polygons)
    masks = _truth_masks(model)
    nl_cells = np.argwhere(model.normal_looking).astype(np.int64).reshape(-1, 2)
    spot_centers = np.array([[s.cx, s.cy] for s in model.spots], dtype=np.float64).reshape(-1, 2)
    truth = {**masks, "downsample": np.int64(cfg.truth_downsample), "patch_size": np.int64(cfg.patch_size),
             "normal_looking_cells": nl_cells, "tumor_point_centers": spot_centers,
             "n_tumor_polygons": np.int64(len(polygons)), "seed": np.int64(seed),
             "config_json": np.array(_config_json(cfg))}
    with atomic_path(paths["truth"]) as tmp:
        _save_npz_deterministic(tmp, truth)
    logger.info("Synthetic slide %s (%dx%d, seed %d) written in %.1f s.", path, cfg.width, cfg.height, seed,
                time.perf_counter() - start)
    return _record(path, seed, cfg, truth, Path(relative_to) if relative_to is not None else path.parent)


def _existing_record(path: Path, seed: int, cfg: SyntheticSlideConfig, relative_to: Path) -> dict[str, Any] | None:
    """The record of an already written slide made with the same seed and config, else ``None``."""
    paths = sidecar_paths(path)
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        with np.load(paths["truth"], allow_pickle=False) as z:
            truth = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if int(truth.get("seed", -1)) != seed or str(truth.get("config_json", "")) != _config_json(cfg):
        logger.info("Synthetic slide %s exists with another seed or config; regenerating it.", path)
        return None
    return _record(path, seed, cfg, truth, relative_to)


def generate_dataset(out_dir: str | os.PathLike, n_train: int = 4, n_val: int = 1, n_test: int = 2, seed: int = 0,
                     overwrite: bool = False, **config_overrides: Any) -> Path:
    """Write a small synthetic dataset and its ``manifest.json``.

    Slides go to ``<out_dir>/slides/<split>_<index>.tif`` (plus sidecars); the manifest lists every slide with
    paths relative to ``out_dir``. Each slide's seed is derived from ``(seed, split, index)``, so adding slides
    to one split leaves the others unchanged.

    Args:
        out_dir: output folder (created).
        n_train: number of training slides.
        n_val: number of validation slides.
        n_test: number of test slides.
        seed: dataset seed.
        overwrite: rewrite slides already present; otherwise a slide whose files exist with the same seed and
            config is kept.
        config_overrides: fields of :class:`SyntheticSlideConfig` (e.g. ``width=2048, tumor_points=0``).

    Returns:
        Path of ``manifest.json``.

    Raises:
        ConfigError: for unknown config fields or bad counts.
    """
    known = {f.name for f in dataclasses.fields(SyntheticSlideConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ConfigError(f"generate_dataset: unknown SyntheticSlideConfig field(s) {unknown}; known: {sorted(known)}.")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"generate_dataset: `n_{name}` must be a non-negative integer, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"generate_dataset: `seed` must be a non-negative integer, got {seed!r}.")
    cfg = SyntheticSlideConfig(**config_overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for split_index, split in enumerate(_SPLITS):
        for i in range(counts[split]):
            slide_seed = int(np.random.SeedSequence([int(seed), split_index, i]).generate_state(1)[0])
            path = out_dir / "slides" / f"{split}_{i:03d}.tif"
            record = None if overwrite else _existing_record(path, slide_seed, cfg, out_dir)
            if record is None:
                record = generate_slide(path, slide_seed, cfg, relative_to=out_dir)
            else:
                logger.info("Synthetic slide %s already present; kept.", path)
            record["split"] = split
            records.append(record)
    manifest = {
        "name": "synthetic H&E-like slides (monai_wsi_ext.testing.synthetic)",
        "version": 1,
        "seed": int(seed),
        "config": cfg.to_dict(),
        "splits": {s: [r["id"] for r in records if r["split"] == s] for s in _SPLITS},
        "slides": records,
    }
    return write_json_atomic(out_dir / "manifest.json", manifest)
