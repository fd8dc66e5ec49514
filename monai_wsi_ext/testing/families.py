"""Slide families that differ in how they are made, for benchmarks the project was not tuned on.

Three families write the same on-disk layout (``<out_dir>/slides/<split>_<index>.tif`` pyramidal JPEG TIFFs with
their mpp in the resolution tags, ``<stem>.xml`` ASAP and ``<stem>.geojson`` QuPath annotations of the tumor,
``<stem>_truth.npz`` masks and ``<out_dir>/manifest.json``), so ``scripts/prepare_dataset.py`` and every bundle
config run on each unchanged:

* ``synthetic``: today's procedural generator, :func:`monai_wsi_ext.testing.synthetic.generate_dataset`.
* ``texture``: made of real H&E pixels. Random crops of the real labelled CRC patches (``patches/crc/*.png`` of
  the source folder, class = file-name prefix) and of the tissue of the real slides (``slides/*.svs``) are
  rotated/flipped and quilted on a lattice with feathered (smooth) seams. Normal tissue is a mosaic of NORM, STR,
  MUS, LYM and ADI regions (and the real slide's tissue); tumor regions are annotation-like polygons (traced
  outlines of unions of discs) filled with TUM texture; the background is white. Train and validation slides use
  one half of the sources (every other patch of a class, the upper half of a real slide), test slides the other
  half, so test slides do not share pixels with training slides.
* ``cells``: a procedural cell model unlike ``synthetic``'s: every tissue type is a jittered-lattice Voronoi
  tessellation (Worley noise) in micrometres, with a nucleus at each cell's seed, membranes on the cell borders,
  fibres and spindle nuclei in anisotropic stroma, dense lymphoid cells, adipocytes, and large pleomorphic
  vesicular tumor cells. Tissue is a few ragged needle-core strips. Ambiguity comes in several shapes and sizes:
  single grid cells, streaks and islands of 1-3 grid cells of tumor rendered to look normal (inside and at the
  edge of lesions; ground truth tumor) and of normal tissue rendered to look tumorous (ground truth normal, not
  annotated). Tumors are lobulated masses or clusters of small nests. Every slide has its own stain (H and E
  vectors and strengths jittered more than in ``synthetic``); slides cycle through several mpp values
  (default 0.25, 0.5 and 1.0 µm/px, the same tissue field in micrometres) and a share of the slides is tumor-free.

The truth file holds what :mod:`monai_wsi_ext.testing.synthetic` writes (``tissue``, ``tumor``, ``tumor_looking`` at
``downsample``, ``patch_size``, ``normal_looking_cells``, ``tumor_point_centers``, ``n_tumor_polygons``, ``seed``,
``config_json``) plus ``family`` and, for ``cells``, the slide's stain (``h_od``, ``e_od``, ``stain_strength``)
and its ambiguous structures (``mimic_centers`` level-0 ``(x, y)``, ``mimic_kind`` ``false_tumor``/
``false_normal``, ``mimic_shape`` ``single``/``streak``/``island``). Manifest records are those of
:func:`~monai_wsi_ext.testing.synthetic.generate_dataset` with ``family`` and ``tumor_free`` added and ``knobs``
holding the family's settings.

The pyramid writer, the truth-file writer and the record builder are :mod:`~monai_wsi_ext.testing.synthetic`'s
(imported, not copied). Everything is deterministic: the same seed and settings give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.annotations import (AnnotationLabel, AnnotationPolygon, rasterize_annotations, write_asap_xml,
                                         write_qupath_geojson)
from monai_wsi_ext.io.atomic import atomic_path, write_json_atomic
from monai_wsi_ext.testing import synthetic
from monai_wsi_ext.testing.synthetic import (_E_OD, _H_OD, _SPLITS, SyntheticSlideConfig, _hash01, _noise_grid,
                                             _noise_points, _record, _rng, _save_npz_deterministic, _write_pyramid,
                                             sidecar_paths)

__all__ = [
    "FAMILIES",
    "TEXTURE_CLASSES",
    "TextureFamilyConfig",
    "CellsFamilyConfig",
    "default_source_dir",
    "load_texture_bank",
    "generate_texture_slide",
    "generate_cells_slide",
    "generate_family_dataset",
]

logger = logging.getLogger(__name__)

#: the slide families :func:`generate_family_dataset` makes
FAMILIES = ("synthetic", "texture", "cells")
#: the classes of the CRC patches (file-name prefixes)
TEXTURE_CLASSES = ("ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
_FAMILY_SALT = {"texture": 0x7E37, "cells": 0xCE11}


def default_source_dir() -> Path:
    """The real test data next to the repository: ``<repo>/../shared/data``."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_int(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{owner}.{name} must be an integer >= {low}, got {value!r}.")


def _check_range(owner: str, name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value <= high:
        raise ConfigError(f"{owner}.{name} must be a number in [{low:g}, {high:g}], got {value!r}.")


def _check_pair(owner: str, name: str, value: Any, low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ConfigError(f"{owner}.{name} must be (min, max) with {low:g} <= min <= max <= {high:g}, got {value!r}.")


def _to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


@dataclass
class _WriterModel:
    """What :func:`synthetic._write_pyramid` reads of a model: the geometry/TIFF settings and the background OD."""

    cfg: SyntheticSlideConfig
    background: np.ndarray


class _BandRenderer:
    """Serves the writer's level-0 tiles from bands of ``tile_size`` rows rendered by ``render_band(y0, rows,
    width)`` (the writer asks for tiles row by row)."""

    def __init__(self, render_band, tile_size: int, width: int):
        self.render_band = render_band
        self.width = -(-width // tile_size) * tile_size
        self._y0: int | None = None
        self._band: np.ndarray | None = None

    def render_tile(self, x0: int, y0: int, size: int) -> np.ndarray:
        if self._y0 != y0:
            self._band = self.render_band(y0, size, self.width)
            self._y0 = y0
        return np.ascontiguousarray(self._band[:, x0:x0 + size])


def _write_slide_files(path: Path, seed: int, wcfg: SyntheticSlideConfig, background_od: np.ndarray, render_band,
                       polygons: list[AnnotationPolygon], truth: dict[str, np.ndarray],
                       relative_to: Path | None, family_cfg: Any, family: str) -> dict[str, Any]:
    """Write the TIFF (synthetic's pyramid writer), the annotations, the truth file, and return the record."""
    paths = sidecar_paths(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    renderer = _BandRenderer(render_band, wcfg.tile_size, wcfg.width)
    with atomic_path(path) as tmp:
        _write_pyramid(Path(tmp), _WriterModel(cfg=wcfg, background=np.asarray(background_od, np.float32)),
                       renderer=renderer)
    write_asap_xml(paths["asap_xml"], polygons)
    write_qupath_geojson(paths["geojson"], polygons)
    with atomic_path(paths["truth"]) as tmp:
        _save_npz_deterministic(Path(tmp), truth)
    record = _record(path, seed, wcfg, truth, relative_to if relative_to is not None else path.parent)
    return _family_record(record, family, family_cfg)


def _family_record(record: dict[str, Any], family: str, family_cfg: Any) -> dict[str, Any]:
    record["family"] = family
    record["knobs"] = _to_dict(family_cfg)
    record["tumor_free"] = bool(family_cfg.tumor_free)
    return record


def _config_json(cfg: Any) -> str:
    return json.dumps(_to_dict(cfg), sort_keys=True)


def _existing(path: Path, seed: int, family: str, cfg: Any, wcfg: SyntheticSlideConfig,
              relative_to: Path) -> dict[str, Any] | None:
    """The record of a slide already written with the same family, seed and settings, else None."""
    import zipfile

    paths = sidecar_paths(path)
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        with np.load(paths["truth"], allow_pickle=False) as z:
            truth = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if (int(truth.get("seed", -1)) != seed or str(truth.get("family", "")) != family
            or str(truth.get("config_json", "")) != _config_json(cfg)):
        return None
    return _family_record(_record(path, seed, wcfg, truth, relative_to), family, cfg)


def _sample_nearest(mask: np.ndarray, ds: float, y0: int, rows: int, width: int) -> np.ndarray:
    """``mask`` (pixel ``(r, c)`` covers level-0 ``[c ds, (c+1) ds) x [r ds, (r+1) ds)``) at the level-0 pixels
    of rows ``y0 .. y0 + rows`` and columns ``0 .. width``."""
    r = np.minimum(((y0 + np.arange(rows) + 0.5) / ds).astype(np.int64), mask.shape[0] - 1)
    c = np.minimum(((np.arange(width) + 0.5) / ds).astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(r, c)]


def _sample_bilinear(mask: np.ndarray, ds: float, y0: int, rows: int, width: int, x0: int = 0) -> np.ndarray:
    """Bilinear interpolation of a float ``mask`` (pixel centres at ``(c + 0.5) ds``) at the level-0 pixel centres
    of rows ``y0 .. y0 + rows`` and columns ``x0 .. x0 + width``."""

    def axis(n: int, start: int, size: int):
        g = np.clip((start + np.arange(n) + 0.5) / ds - 0.5, 0, size - 1)
        i0 = np.minimum(np.floor(g).astype(np.int64), max(size - 2, 0))
        return i0, np.minimum(i0 + 1, size - 1), (g - i0).astype(np.float32)

    r0, r1, fy = axis(rows, y0, mask.shape[0])
    c0, c1, fx = axis(width, x0, mask.shape[1])
    lo, hi = int(c0.min()), int(c1.max()) + 1
    band = mask[r0, lo:hi] * (1 - fy)[:, None] + mask[r1, lo:hi] * fy[:, None]  # rows first, on the coarse columns
    return band[:, c0 - lo] * (1 - fx) + band[:, c1 - lo] * fx


def _mask_at_truth(mask: np.ndarray, ds: float, truth_ds: float, shape: tuple[int, int]) -> np.ndarray:
    """Nearest sampling of a mask at ``ds`` at the centres of the truth-mask pixels at ``truth_ds``."""
    r = np.minimum(((np.arange(shape[0]) + 0.5) * truth_ds / ds).astype(np.int64), mask.shape[0] - 1)
    c = np.minimum(((np.arange(shape[1]) + 0.5) * truth_ds / ds).astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(r, c)]


def _disc(mask: np.ndarray, cx: float, cy: float, r: float, value: bool = True) -> None:
    """Set the pixels of ``mask`` whose centres lie within ``r`` of ``(cx, cy)`` (mask pixel units)."""
    h, w = mask.shape
    r0, r1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    c0, c1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.mgrid[r0:r1, c0:c1]
    mask[r0:r1, c0:c1][(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = value


def _capsule(mask: np.ndarray, p: tuple[float, float], q: tuple[float, float], half_width: float) -> None:
    """Set the pixels within ``half_width`` of the segment ``p``-``q`` (mask pixel units, ``(x, y)``)."""
    h, w = mask.shape
    pad = half_width + 2
    c0, c1 = max(int(min(p[0], q[0]) - pad), 0), min(int(max(p[0], q[0]) + pad) + 1, w)
    r0, r1 = max(int(min(p[1], q[1]) - pad), 0), min(int(max(p[1], q[1]) + pad) + 1, h)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((xx - p[0]) * dx + (yy - p[1]) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    d2 = (xx - p[0] - t * dx) ** 2 + (yy - p[1] - t * dy) ** 2
    mask[r0:r1, c0:c1][d2 <= half_width * half_width] = True


def _traced_polygons(mask: np.ndarray, ds: float, min_area_px: float, name: str) -> list[AnnotationPolygon]:
    """Annotation-like tumor polygons: the outlines of the (hole-filled) components of ``mask`` at ``ds`` traced
    and simplified, in level-0 coordinates."""
    from scipy.ndimage import binary_fill_holes
    from skimage.measure import approximate_polygon, find_contours

    filled = binary_fill_holes(mask)
    padded = np.pad(filled.astype(np.float32), 1)
    polygons = []
    for contour in find_contours(padded, 0.5):
        ring = approximate_polygon(contour, tolerance=0.6)[:-1]  # (row, col), the closing vertex dropped
        if len(ring) < 3:
            continue
        xy = np.stack([(ring[:, 1] - 1 + 0.5) * ds, (ring[:, 0] - 1 + 0.5) * ds], axis=1)
        area = 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], -1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], -1))))
        if area < min_area_px:
            continue
        polygons.append(AnnotationPolygon(exterior=np.round(xy, 2), label=AnnotationLabel.TUMOR,
                                          name=f"{name} {len(polygons)}", group="_0"))
    return polygons


def _lobulated(rng: np.random.Generator, mask: np.ndarray, cx: float, cy: float, radius: float,
               n_lobes: tuple[int, int] = (3, 7)) -> None:
    """A lobulated region: the union of a central disc and a few overlapping discs around it (mask px units)."""
    _disc(mask, cx, cy, radius * rng.uniform(0.55, 0.8))
    for _ in range(int(rng.integers(n_lobes[0], n_lobes[1] + 1))):
        ang, dist = rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.25, 0.7)
        _disc(mask, cx + dist * math.cos(ang), cy + dist * math.sin(ang), radius * rng.uniform(0.3, 0.55))


def _tumor_free_flags(n: int, fraction: float) -> list[bool]:
    """Which of ``n`` slides of a split are tumor-free: the last ``round(n * fraction)`` (at least one slide with
    tumor remains when ``fraction < 1`` and ``n >= 1``)."""
    k = int(math.floor(n * fraction + 0.5))
    if fraction < 1:
        k = min(k, max(n - 1, 0))
    return [i >= n - k for i in range(n)]


def _stain(rng: np.random.Generator, jitter: float, strength: tuple[float, float]) -> tuple[np.ndarray, np.ndarray,
                                                                                            np.ndarray]:
    h = np.clip(_H_OD + rng.normal(0, jitter, 3), 0.05, None)
    e = np.clip(_E_OD + rng.normal(0, jitter, 3), 0.05, None)
    s = rng.uniform(strength[0], strength[1], 2)
    return (h / np.linalg.norm(h)).astype(np.float32), (e / np.linalg.norm(e)).astype(np.float32), s.astype(np.float32)


def _place(rng: np.random.Generator, allowed: np.ndarray, min_dist: np.ndarray | None, need: float,
           tries: int = 200) -> tuple[float, float] | None:
    """A random ``(x, y)`` mask-pixel centre where ``allowed`` holds (and ``min_dist >= need`` when given)."""
    ok = allowed if min_dist is None else allowed & (min_dist >= need)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    r, c = divmod(int(idx[int(rng.integers(idx.size))]), ok.shape[1])
    return c + 0.5, r + 0.5


def _grid_cells(tumor: np.ndarray, looking: np.ndarray, truth_ds: float, cell_px: float, width: int,
                height: int) -> np.ndarray:
    """Rows ``(row, col)`` of the level-0 grid cells whose centre is tumor but not rendered tumor-looking."""
    gh, gw = -(-height // int(cell_px)), -(-width // int(cell_px))
    cy = ((np.arange(gh) + 0.5) * cell_px / truth_ds).astype(np.int64).clip(0, tumor.shape[0] - 1)
    cx = ((np.arange(gw) + 0.5) * cell_px / truth_ds).astype(np.int64).clip(0, tumor.shape[1] - 1)
    sel = tumor[np.ix_(cy, cx)] & ~looking[np.ix_(cy, cx)]
    return np.argwhere(sel).astype(np.int64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------------------
# texture family: real H&E pixels quilted into slides
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TextureFamilyConfig:
    """Settings of one ``texture`` slide.

    Args:
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        mpp: level-0 µm per pixel (the sources, 0.5 µm/px, are resampled to it).
        source_dir: folder of the real data (``patches/crc/*.png`` and, optionally, ``slides/*.svs``); None: the
            repository's ``../shared/data``.
        source_part: which half of the sources the slide is made of: ``train`` (every other patch of a class from
            the first on, the upper half of each real slide), ``test`` (the others) or ``all``. The dataset gives
            train and validation slides ``train`` and test slides ``test``.
        use_slides: also use the tissue of the real slides (``slides/*.svs`` read with the project's reader) as a
            normal texture.
        patch_size: level-0 side of the grid cells the ambiguous structures are sized in.
        tumor_free: no tumor region (the annotation files hold no polygon).
        tumor_regions: ``(min, max)`` tumor polygons of a tumor slide.
        tumor_radius_um: ``(min, max)`` radius of a tumor region in µm (capped to fit the slide).
        tumor_points: TUM-texture islands (0.3-1.5 grid cells in radius) placed in normal tissue; ground truth normal.
        normal_islands: normal-texture islands (0.5-1.5 grid cells) inside each tumor region; ground truth tumor.
        normal_weights: relative area of the normal texture classes (``SLIDE`` is the real slides' tissue).
        region_um: size of the normal-class regions in µm.
        quilt_step: lattice step of the quilt in level-0 pixels.
        quilt_overlap: width of the feathered seams in level-0 pixels.
        tissue_fraction: share of the slide covered by tissue (before the tumor regions are added).
        stain_jitter: per-slide colour variation (standard deviation of an optical-density mixing matrix).
        tile_size: TIFF tile side (a multiple of 16).
        jpeg_quality: JPEG quality of the tiles.
        truth_downsample: level-0 pixels per truth-mask pixel.
    """

    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    source_dir: str | None = None
    source_part: str = "all"
    use_slides: bool = True
    patch_size: int = 64
    tumor_free: bool = False
    tumor_regions: tuple[int, int] = (1, 3)
    tumor_radius_um: tuple[float, float] = (90.0, 320.0)
    tumor_points: int = 5
    normal_islands: int = 2
    normal_weights: dict[str, float] = field(default_factory=lambda: {
        "NORM": 0.3, "STR": 0.2, "MUS": 0.15, "LYM": 0.1, "ADI": 0.1, "SLIDE": 0.15})
    region_um: float = 260.0
    quilt_step: int = 96
    quilt_overlap: int = 32
    tissue_fraction: float = 0.5
    stain_jitter: float = 0.04
    tile_size: int = 256
    jpeg_quality: int = 85
    truth_downsample: int = 16

    def __post_init__(self):
        self.tumor_regions = tuple(int(v) for v in self.tumor_regions)
        self.tumor_radius_um = tuple(float(v) for v in self.tumor_radius_um)
        self.normal_weights = {str(k): float(v) for k, v in dict(self.normal_weights).items()}
        if self.source_dir is None:
            self.source_dir = str(default_source_dir())
        self.source_dir = str(Path(self.source_dir).resolve())
        self.validate()

    def validate(self) -> None:
        """Check ranges.

        Raises:
            ConfigError: naming the field, its value and the allowed range.
        """
        owner = "TextureFamilyConfig"
        for name, low in {"width": 256, "height": 256, "patch_size": 8, "tumor_points": 0, "normal_islands": 0,
                          "quilt_step": 16, "quilt_overlap": 2, "tile_size": 16, "truth_downsample": 1}.items():
            _check_int(owner, name, getattr(self, name), low)
        if self.tile_size % 16:
            raise ConfigError(f"{owner}.tile_size must be a multiple of 16, got {self.tile_size}.")
        if self.quilt_overlap % 2 or self.quilt_overlap > self.quilt_step:
            raise ConfigError(f"{owner}.quilt_overlap must be even and <= quilt_step, got {self.quilt_overlap}.")
        if self.source_part not in ("train", "test", "all"):
            raise ConfigError(f"{owner}.source_part must be 'train', 'test' or 'all', got {self.source_part!r}.")
        _check_range(owner, "mpp", self.mpp, 0.2, 1.0)
        _check_range(owner, "tissue_fraction", self.tissue_fraction, 0.1, 0.9)
        _check_range(owner, "stain_jitter", self.stain_jitter, 0.0, 0.3)
        _check_range(owner, "region_um", self.region_um, 10.0, 1e5)
        _check_range(owner, "jpeg_quality", self.jpeg_quality, 1, 100)
        _check_pair(owner, "tumor_regions", self.tumor_regions, 0, 50)
        _check_pair(owner, "tumor_radius_um", self.tumor_radius_um, 5.0, 1e5)
        unknown = sorted(set(self.normal_weights) - set(TEXTURE_CLASSES) - {"SLIDE"})
        if unknown or "TUM" in self.normal_weights or not any(v > 0 for v in self.normal_weights.values()):
            raise ConfigError(f"{owner}.normal_weights must weight classes of {TEXTURE_CLASSES[:-1]} or SLIDE (not "
                              f"TUM), at least one > 0; got {self.normal_weights!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dictionary."""
        return _to_dict(self)


def _split_sources(items: list[Any], part: str, halves) -> list[Any]:
    """``train``: items 0, 2, 4...; ``test``: items 1, 3...; a single item is cut in halves by ``halves``."""
    if part == "all":
        return list(items)
    if len(items) >= 2:
        return list(items[0 if part == "train" else 1::2])
    return [halves(item, part) for item in items]


def _half(img: np.ndarray, part: str) -> np.ndarray:
    h = img.shape[0] // 2
    return img[:h] if part == "train" else img[h:]


def _crc_files(root: Path) -> list[Path]:
    """The labelled CRC patches under ``root`` (``patches/crc/*.png``).

    Raises:
        ConfigError: there are none; the message names the folder.
    """
    crc = Path(root) / "patches" / "crc"
    files = sorted(crc.glob("*.png")) if crc.is_dir() else []
    if not files:
        raise ConfigError(f"texture family: no source texture in {crc} (expected the labelled CRC patches "
                          f"patches/crc/<CLASS>-*.png, CLASS in {TEXTURE_CLASSES}); give `source_dir` the folder "
                          f"that holds patches/crc (default: the repository's ../shared/data).")
    return files


@functools.lru_cache(maxsize=8)
def _load_bank_cached(source_dir: str, part: str, mpp: float, use_slides: bool) -> dict[str, tuple[np.ndarray, ...]]:
    from PIL import Image

    root = Path(source_dir)
    files = _crc_files(root)
    by_class: dict[str, list[np.ndarray]] = {}
    for f in files:
        cls = f.name.split("-", 1)[0].upper()
        if cls in TEXTURE_CLASSES:
            with Image.open(f) as im:
                by_class.setdefault(cls, []).append(np.asarray(im.convert("RGB")))
    bank = {cls: _split_sources(imgs, part, _half) for cls, imgs in by_class.items()}
    if use_slides:
        crops = _slide_crops(root / "slides", part)
        if crops:
            bank["SLIDE"] = crops
    out = {}
    for cls, imgs in bank.items():
        imgs = [_resample(np.asarray(im), 0.5 / mpp) for im in imgs]
        out[cls] = tuple(im.astype(np.float32) for im in imgs)
    return out


def _resample(img: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1) < 0.02:
        return img
    from scipy.ndimage import zoom

    return np.clip(zoom(img.astype(np.float32), (factor, factor, 1), order=1) + 0.5, 0, 255).astype(np.uint8)


def _read_source_slide(path: Path) -> np.ndarray | None:
    """Level 0 of a small real slide at about 0.5 µm/px as RGB, or None when it is not one (or cannot be read).

    OpenSlide is tried first (it does not import MONAI); the project's reader is the fallback."""
    try:
        import openslide

        with openslide.OpenSlide(str(path)) as osr:
            mpp = float(osr.properties.get(openslide.PROPERTY_NAME_MPP_X, 0) or 0)
            w, h = osr.dimensions
            if not 0.4 <= mpp <= 0.6 or w * h > 40_000_000:
                return None
            return np.asarray(osr.read_region((0, 0), 0, (w, h)).convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - fall back to the project's reader
        logger.debug("openslide could not read %s (%s); trying the project's reader.", path, exc)
    try:
        from monai_wsi_ext.io.wsi import open_slide

        with open_slide(path) as slide:
            w, h = slide.dimensions
            if slide.mpp is None or not 0.4 <= slide.mpp <= 0.6 or w * h > 40_000_000:
                return None
            return np.asarray(slide.read_region(0, 0, w, h))[..., :3]
    except Exception as exc:  # noqa: BLE001 - an unreadable optional source is skipped, not fatal
        logger.info("texture family: real slide %s skipped (%s).", path, exc)
        return None


def _slide_crops(folder: Path, part: str, size: int = 224, max_crops: int = 16) -> list[np.ndarray]:
    """Tissue crops (``size`` px at about 0.5 µm/px) of the real slides in ``folder`` at about 0.5 µm/px;
    ``train`` takes them from the upper half of each slide, ``test`` from the lower half."""
    crops: list[np.ndarray] = []
    for path in sorted(folder.glob("*.svs")) if folder.is_dir() else []:
        img = _read_source_slide(path)
        if img is None:
            continue
        h, w = img.shape[:2]
        img = np.asarray(img)[..., :3]
        hi, lo = img.max(axis=2).astype(np.int16), img.min(axis=2).astype(np.int16)
        tissue = (hi - lo > 0.12 * np.maximum(hi, 1)) & (hi + lo < 450)
        half = h // 2
        rows = range(0, half - size, size // 2) if part == "train" else range(half, h - size, size // 2)
        if part == "all":
            rows = range(0, h - size, size // 2)
        integral = np.pad(tissue.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
        found = []
        for y in rows:
            for x in range(0, w - size, size // 2):
                count = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
                if count >= 0.97 * size * size:
                    found.append(img[y:y + size, x:x + size])
        if found:
            step = max(len(found) // max_crops, 1)
            crops.extend(found[::step][:max_crops])
    return crops


def load_texture_bank(source_dir: str | os.PathLike | None = None, part: str = "all", mpp: float = 0.5,
                      use_slides: bool = True) -> dict[str, list[np.ndarray]]:
    """The source textures of the ``texture`` family: class -> list of ``float32`` RGB images at ``mpp``.

    Args:
        source_dir: folder holding ``patches/crc/<CLASS>-*.png`` (and optionally ``slides/*.svs``); None: the
            repository's ``../shared/data``.
        part: ``train``, ``test`` or ``all`` (see :class:`TextureFamilyConfig`).
        mpp: resolution the images are resampled to.
        use_slides: add the class ``SLIDE``, tissue crops of the real slides.

    Raises:
        ConfigError: the folder holds no CRC patches (the message names it).
    """
    folder = str(Path(source_dir if source_dir is not None else default_source_dir()).resolve())
    return {k: list(v) for k, v in _load_bank_cached(folder, part, float(mpp), bool(use_slides)).items()}


class _Quilt:
    """Random crops of source images pasted on a lattice of step ``step`` with feathered, overlapping windows.

    Tile ``(ix, iy)`` covers level-0 ``[ix step - overlap/2, ix step + step + overlap/2)`` (and the same in y). Its
    image and offset come from hashes of ``(ix, iy)``; its rotation/flip from value noise over the lattice, so
    neighbouring tiles mostly share an orientation (fibres run on across seams). Tiles where ``needed`` is false are
    skipped. Any band renders the same pixels.
    """

    def __init__(self, sources: list[np.ndarray], needed: np.ndarray, step: int, overlap: int, salt: int):
        self.sources, self.needed, self.step, self.ov, self.salt = sources, needed, step, overlap, salt
        self.c = step + overlap
        ramp = np.clip((np.arange(self.c) + 0.5) / overlap, 0, 1)
        ramp = np.minimum(ramp, ramp[::-1])
        ramp = (ramp * ramp * (3 - 2 * ramp)).astype(np.float32) + np.float32(1e-3)
        self.window = ramp[:, None] * ramp[None, :]

    def render(self, y0: int, rows: int, x0: int, cols: int) -> np.ndarray:
        """The quilt on level-0 rows ``y0 .. y0 + rows`` and columns ``x0 .. x0 + cols`` (``float32`` RGB; zeros
        where no needed tile lies)."""
        step, ov, c = self.step, self.ov, self.c
        acc = np.zeros((rows, cols, 3), dtype=np.float32)
        wsum = np.zeros((rows, cols), dtype=np.float32)
        iy0 = max((y0 + ov // 2 - c) // step, 0)
        iy1 = min((y0 + rows + ov // 2) // step, self.needed.shape[0] - 1)
        ix0 = max((x0 + ov // 2 - c) // step, 0)
        ix1 = min((x0 + cols + ov // 2) // step, self.needed.shape[1] - 1)
        if ix1 < ix0:
            return acc
        ix = np.arange(ix0, ix1 + 1)
        for iy in range(iy0, iy1 + 1):
            ty = iy * step - ov // 2
            a, b = max(ty, y0), min(ty + c, y0 + rows)
            need = self.needed[iy, ix0:ix1 + 1]
            if a >= b or not need.any():
                continue
            iys = np.full(ix.size, iy)
            pick, oy_u, ox_u = (_hash01(ix, iys, self.salt + k) for k in range(3))
            orient = _noise_points(ix + 0.5, iys + 0.5, 3.0, self.salt + 3)
            for j in np.flatnonzero(need):
                src = self.sources[int(pick[j] * len(self.sources)) % len(self.sources)]
                oy = int(oy_u[j] * (src.shape[0] - c + 1))
                ox = int(ox_u[j] * (src.shape[1] - c + 1))
                k = int(orient[j] * 24) % 8
                crop = np.rot90(src[oy:oy + c, ox:ox + c], k % 4)
                if k >= 4:
                    crop = crop[:, ::-1]
                tx = int(ix[j]) * step - ov // 2
                xa, xb = max(tx, x0), min(tx + c, x0 + cols)
                if xa >= xb:
                    continue
                win = self.window[a - ty:b - ty, xa - tx:xb - tx]
                acc[a - y0:b - y0, xa - x0:xb - x0] += crop[a - ty:b - ty, xa - tx:xb - tx] * win[..., None]
                wsum[a - y0:b - y0, xa - x0:xb - x0] += win
        return acc / np.maximum(wsum, 1e-6)[..., None]


def _tiles_needed(weight: np.ndarray, ds: int, step: int, overlap: int, shape: tuple[int, int],
                  threshold: float = 0.02) -> np.ndarray:
    """``(nty, ntx)`` bool: the quilt tiles whose footprint holds a pixel of ``weight`` (at ``ds``) above
    ``threshold``."""
    from scipy.ndimage import maximum_filter

    c = step + overlap
    pooled = maximum_filter(weight, size=int(math.ceil(c / ds)) + 2, mode="constant")
    cy = np.minimum(((np.arange(shape[0]) * step - overlap / 2 + c / 2) / ds).astype(np.int64).clip(0),
                    weight.shape[0] - 1)
    cx = np.minimum(((np.arange(shape[1]) * step - overlap / 2 + c / 2) / ds).astype(np.int64).clip(0),
                    weight.shape[1] - 1)
    return pooled[np.ix_(cy, cx)] > threshold


def _colour_jitter(bank: dict[str, list[np.ndarray]], rng: np.random.Generator, jitter: float
                   ) -> dict[str, list[np.ndarray]]:
    """The bank with one per-slide optical-density transform (near-identity mixing matrix and strength)."""
    m = (np.eye(3) + rng.normal(0, jitter, (3, 3))) * rng.uniform(1 - 2 * jitter, 1 + 2 * jitter)
    m = m.astype(np.float32)
    out = {}
    for cls, imgs in bank.items():
        out[cls] = []
        for im in imgs:
            od = -np.log((im + 1) / 256.0)
            out[cls].append(np.clip(256.0 * np.exp(-np.clip(od @ m.T, 0, None)) - 1, 0, 255).astype(np.float32))
    return out


def generate_texture_slide(path: str | os.PathLike, seed: int, config: TextureFamilyConfig | None = None,
                           relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write one ``texture`` slide (TIFF, ASAP XML, GeoJSON, truth ``.npz``) and return its manifest record.

    Raises:
        ConfigError: a bad path, seed or config, or no source texture in ``config.source_dir``.
    """
    from scipy.ndimage import binary_dilation, distance_transform_edt, gaussian_filter

    path, cfg = Path(path), config if config is not None else TextureFamilyConfig()
    _check_slide_args("generate_texture_slide", path, seed)
    cfg.validate()
    start = time.perf_counter()
    bank = load_texture_bank(cfg.source_dir, cfg.source_part, cfg.mpp, cfg.use_slides)
    need = cfg.quilt_step + cfg.quilt_overlap
    small = sorted(k for k, v in bank.items() if any(min(im.shape[:2]) < need for im in v))
    if small:
        logger.warning("texture family: source images of %s smaller than quilt_step + quilt_overlap = %d px are not "
                       "used.", small, need)
    bank = {k: [im for im in v if min(im.shape[:2]) >= need] for k, v in bank.items()}
    normal = [k for k, w in cfg.normal_weights.items() if w > 0 and bank.get(k)]
    if not bank.get("TUM") or not normal:
        raise ConfigError(f"texture family: {cfg.source_dir} has no TUM patch or no normal class of "
                          f"{sorted(cfg.normal_weights)} at least {need} px (after resampling to {cfg.mpp} µm/px).")
    rng = _rng(seed, 0x7E37)
    bank = _colour_jitter(bank, rng, cfg.stain_jitter)
    w, h, ds = cfg.width, cfg.height, 4
    mh, mw = -(-h // ds), -(-w // ds)
    cell = cfg.patch_size / ds  # grid cell in mask px
    # tissue: thresholded two-octave value noise under an elliptical envelope
    ys, xs = (np.arange(mh) + 0.5) * ds, (np.arange(mw) + 0.5) * ds
    salts = [int(v) for v in rng.integers(0, 2**32, 8)]
    big = min(w, h)
    f = 0.65 * _noise_grid(xs, ys, 0.3 * big, salts[0]) + 0.35 * _noise_grid(xs, ys, 0.09 * big, salts[1])
    ex, ey = (xs[None, :] / w - 0.5) / 0.5, (ys[:, None] / h - 0.5) / 0.5
    f = f - 0.9 * np.clip(ex * ex + ey * ey - 0.35, 0, None)
    tissue = f > np.quantile(f, 1 - cfg.tissue_fraction)
    # tumor regions: traced outlines of lobulated unions of discs, placed deep in the tissue
    n_tumors = 0 if cfg.tumor_free else int(rng.integers(cfg.tumor_regions[0], cfg.tumor_regions[1] + 1))
    region = np.zeros((mh, mw), dtype=bool)
    depth = distance_transform_edt(tissue)
    for _ in range(n_tumors):
        r_um = rng.uniform(*cfg.tumor_radius_um)
        radius = min(r_um / cfg.mpp / ds, 0.2 * min(mh, mw))
        away = ~binary_dilation(region, iterations=max(int(cell), 1)) if region.any() else np.ones_like(region)
        spot = _place(rng, tissue & away, depth, 0.6 * radius)
        if spot is None:
            spot = _place(rng, tissue & away, None, 0)
        if spot is None:
            continue
        _lobulated(rng, region, spot[0], spot[1], radius)
    polygons = _traced_polygons(region, ds, (cfg.patch_size / 2) ** 2, "Tumor")
    region = rasterize_annotations(polygons, (mh, mw), ds) == 2 if polygons else np.zeros((mh, mw), bool)
    tissue |= region
    # ambiguity: normal islands inside tumor (truth tumor) and TUM islands in normal tissue (truth normal)
    look = region.copy()
    tumor_depth = distance_transform_edt(region)
    for _ in range(cfg.normal_islands * len(polygons)):
        r = cell * rng.uniform(0.5, 1.5)
        spot = _place(rng, region, tumor_depth, 0.5 * r)
        if spot is not None:
            island = np.zeros_like(look)
            _lobulated(rng, island, spot[0], spot[1], r, (1, 3))
            look &= ~(island & region)
    free = tissue & ~binary_dilation(region, iterations=max(int(2 * cell), 1)) if region.any() else tissue.copy()
    centres = []
    for _ in range(cfg.tumor_points):
        r = cell * rng.uniform(0.3, 1.5)
        spot = _place(rng, free, depth, r)
        if spot is None:
            break
        island = np.zeros_like(look)
        _lobulated(rng, island, spot[0], spot[1], r, (1, 3))
        island &= tissue & ~region
        look |= island
        centres.append((spot[0] * ds, spot[1] * ds))
        free &= ~binary_dilation(island, iterations=max(int(cell), 1))
    look &= tissue
    # normal-class regions: a sharp softmax of weighted value noise at the mask resolution, one quilt per class
    step, ov = cfg.quilt_step, cfg.quilt_overlap
    lattice = (-(-h // step) + 2, -(-w // step) + 2)
    region_px = cfg.region_um / cfg.mpp
    scores = np.stack([cfg.normal_weights[k] ** 0.5 * _noise_grid(xs, ys, region_px, salts[2] + i)
                       for i, k in enumerate(normal)])
    weights = np.exp((scores - scores.max(axis=0, keepdims=True)) / 0.01)
    weights = (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)
    weights *= binary_dilation(tissue, iterations=3)[None]  # no quilt tiles in the background
    quilts = [_Quilt(bank[k], _tiles_needed(weights[i], ds, step, ov, lattice), step, ov, salts[3] + 7 * i)
              for i, k in enumerate(normal)]
    look_soft = gaussian_filter(look.astype(np.float32), 0.8)
    tumor_quilt = _Quilt(bank["TUM"], _tiles_needed(look_soft, ds, step, ov, lattice, 1e-3), step, ov, salts[4])
    tissue_soft = gaussian_filter(tissue.astype(np.float32), 0.8)
    background = np.float32(rng.uniform(236, 247)) + rng.normal(0, 1.5, 3).astype(np.float32)
    salt_grain = salts[5]

    def render_chunk(y0: int, rows: int, x0: int, cols: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Tissue colour and alpha of a block (None where the block has no tissue)."""
        alpha = _sample_bilinear(tissue_soft, ds, y0, rows, cols, x0)
        if alpha.max() <= 0:
            return None
        tex = np.zeros((rows, cols, 3), dtype=np.float32)
        total = np.zeros((rows, cols), dtype=np.float32)
        for i, quilt in enumerate(quilts):
            wk = _sample_bilinear(weights[i], ds, y0, rows, cols, x0)
            wk[wk < 0.02] = 0
            if wk.any():
                tex += quilt.render(y0, rows, x0, cols) * wk[..., None]
                total += wk
        tex /= np.maximum(total, 1e-6)[..., None]
        a_t = _sample_bilinear(look_soft, ds, y0, rows, cols, x0)
        if a_t.max() > 1e-3:
            tex += (tumor_quilt.render(y0, rows, x0, cols) - tex) * a_t[..., None]
        return tex, alpha * (total > 0)

    def render_band(y0: int, rows: int, width: int) -> np.ndarray:
        grain = _rng(seed, salt_grain, y0).standard_normal((rows, width, 1), dtype=np.float32) * np.float32(2.0)
        out = np.broadcast_to(background, (rows, width, 3)).astype(np.float32)
        for x0 in range(0, width, 512):  # blocks: each class quilt is rendered only where the class is
            cols = min(512, width - x0)
            part = render_chunk(y0, rows, x0, cols)
            if part is not None:
                view = out[:, x0:x0 + cols]
                view += (part[0] - view) * part[1][..., None]
        return np.clip(out + grain + 0.5, 0, 255).astype(np.uint8)

    d = cfg.truth_downsample
    shape = (-(-h // d), -(-w // d))
    t_tissue = _mask_at_truth(tissue, ds, d, shape)
    t_tumor = rasterize_annotations(polygons, shape, d) == 2 if polygons else np.zeros(shape, bool)
    t_tissue |= t_tumor  # tumor is tissue (the two rasters may differ by a pixel along the outline)
    t_look = _mask_at_truth(look, ds, d, shape) & t_tissue
    truth = {"tissue": t_tissue, "tumor": t_tumor, "tumor_looking": t_look, "downsample": np.int64(d),
             "patch_size": np.int64(cfg.patch_size),
             "normal_looking_cells": _grid_cells(t_tumor, t_look, d, cfg.patch_size, w, h),
             "tumor_point_centers": np.array(centres, dtype=np.float64).reshape(-1, 2),
             "n_tumor_polygons": np.int64(len(polygons)), "seed": np.int64(seed),
             "config_json": np.array(_config_json(cfg)), "family": np.array("texture")}
    bg_od = -np.log((background + 1) / 256.0)
    record = _write_slide_files(path, seed, _writer_config(w, h, cfg.mpp, cfg.tile_size, cfg.patch_size,
                                                           cfg.jpeg_quality, d), bg_od, render_band, polygons,
                                truth, Path(relative_to) if relative_to is not None else None, cfg, "texture")
    logger.info("Texture slide %s (%dx%d, seed %d, sources %s) written in %.1f s.", path, w, h, seed,
                cfg.source_part, time.perf_counter() - start)
    return record


def _writer_config(width: int, height: int, mpp: float, tile_size: int, patch_size: int, jpeg_quality: int,
                   truth_downsample: int) -> SyntheticSlideConfig:
    """The :class:`SyntheticSlideConfig` the pyramid writer and the record builder read (geometry and TIFF)."""
    return SyntheticSlideConfig(width=int(width), height=int(height), mpp=float(mpp), tile_size=int(tile_size),
                                patch_size=max(int(round(patch_size)), 8), jpeg_quality=int(jpeg_quality),
                                truth_downsample=int(truth_downsample), tumor_regions=0, tumor_points=0)


def _check_slide_args(owner: str, path: Path, seed: Any) -> None:
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(f"{owner}: `path` must end in .tif or .tiff, got {str(path)!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{owner}: `seed` must be a non-negative integer, got {seed!r}.")


# ---------------------------------------------------------------------------------------------------------------
# cells family: a Voronoi cell model in micrometres with shaped ambiguity, stain and mpp variation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CellsFamilyConfig:
    """Settings of one ``cells`` slide.

    The tissue field is ``width x height`` pixels at ``grid_mpp``; the slide's level 0 has ``grid_mpp / mpp``
    times as many pixels per side, so slides of different mpp show the same amount of tissue. With the default
    mpp values (0.25, 0.5, 1.0) every slide has a pyramid level at ``grid_mpp`` = 1.0 µm/px, which is where
    ``prepare_dataset --target_mpp 1.0`` reads them.

    Args:
        width: field width in pixels at ``grid_mpp``.
        height: field height in pixels at ``grid_mpp``.
        mpp: this slide's level-0 µm per pixel.
        grid_mpp: µm per pixel of the grid the ambiguity sizes refer to.
        patch_size: grid cell side in pixels at ``grid_mpp`` (``patch_size * grid_mpp`` µm).
        tumor_free: no tumor (the annotation files hold no polygon); tumor-looking mimics are still placed.
        tumor_regions: ``(min, max)`` tumor lesions of a tumor slide (lobulated masses or clusters of nests).
        tumor_radius_cells: ``(min, max)`` lesion radius in grid cells.
        false_tumor: structures of normal tissue rendered as tumor (ground truth normal, not annotated).
        false_normal: structures of tumor rendered as normal tissue, per lesion (ground truth tumor).
        shape_weights: relative frequency of the ambiguous shapes ``(single cell, streak, island)``: a single grid
            cell (radius 0.3-0.5 cell), a streak (2-6 cells long, 0.4-0.8 wide), an island of 1, 2 or 3 cells.
        n_cores: ``(min, max)`` needle-core tissue strips.
        stain_jitter: standard deviation of the per-slide jitter of the H and E optical-density vectors.
        stain_strength: ``(min, max)`` per-slide factor of each stain's strength.
        mask_um: µm per pixel of the internal layout masks.
        truth_um: µm per pixel of the truth masks (the truth downsample is ``truth_um / mpp`` level-0 pixels).
        tile_size: TIFF tile side (a multiple of 16).
        jpeg_quality: JPEG quality of the tiles.
    """

    width: int = 2048
    height: int = 2048
    mpp: float = 0.5
    grid_mpp: float = 1.0
    patch_size: int = 64
    tumor_free: bool = False
    tumor_regions: tuple[int, int] = (1, 3)
    tumor_radius_cells: tuple[float, float] = (1.5, 4.5)
    false_tumor: int = 8
    false_normal: int = 4
    shape_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    n_cores: tuple[int, int] = (2, 4)
    stain_jitter: float = 0.12
    stain_strength: tuple[float, float] = (0.7, 1.3)
    mask_um: float = 1.0
    truth_um: float = 8.0
    tile_size: int = 256
    jpeg_quality: int = 85

    def __post_init__(self):
        self.tumor_regions = tuple(int(v) for v in self.tumor_regions)
        self.tumor_radius_cells = tuple(float(v) for v in self.tumor_radius_cells)
        self.shape_weights = tuple(float(v) for v in self.shape_weights)
        self.n_cores = tuple(int(v) for v in self.n_cores)
        self.stain_strength = tuple(float(v) for v in self.stain_strength)
        self.validate()

    def validate(self) -> None:
        """Check ranges.

        Raises:
            ConfigError: naming the field, its value and the allowed range.
        """
        owner = "CellsFamilyConfig"
        for name, low in {"width": 128, "height": 128, "patch_size": 4, "false_tumor": 0, "false_normal": 0,
                          "tile_size": 16}.items():
            _check_int(owner, name, getattr(self, name), low)
        if self.tile_size % 16:
            raise ConfigError(f"{owner}.tile_size must be a multiple of 16, got {self.tile_size}.")
        _check_range(owner, "mpp", self.mpp, 0.1, 4.0)
        _check_range(owner, "grid_mpp", self.grid_mpp, 0.1, 8.0)
        _check_range(owner, "stain_jitter", self.stain_jitter, 0.0, 0.3)
        _check_range(owner, "mask_um", self.mask_um, 0.25, 16.0)
        _check_range(owner, "truth_um", self.truth_um, self.mpp, 1e3)
        _check_range(owner, "jpeg_quality", self.jpeg_quality, 1, 100)
        _check_pair(owner, "tumor_regions", self.tumor_regions, 0, 50)
        _check_pair(owner, "tumor_radius_cells", self.tumor_radius_cells, 0.3, 1e3)
        _check_pair(owner, "n_cores", self.n_cores, 1, 20)
        _check_pair(owner, "stain_strength", self.stain_strength, 0.1, 3.0)
        if len(self.shape_weights) != 3 or min(self.shape_weights) < 0 or sum(self.shape_weights) <= 0:
            raise ConfigError(f"{owner}.shape_weights must be 3 non-negative weights (single, streak, island) with "
                              f"a positive sum, got {self.shape_weights!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dictionary."""
        return _to_dict(self)

    @property
    def level0_size(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` of the slide."""
        f = self.grid_mpp / self.mpp
        return int(round(self.width * f)), int(round(self.height * f))


#: cell types of the ``cells`` family (lengths in µm). ``spacing``: lattice step; ``stretch``: elongation of the
#: cells (stroma); ``nuc_r``: nucleus radius; ``nuc_frac``: share of cells with a visible nucleus; ``pleo``:
#: relative spread of nucleus sizes; ``irr``: outline irregularity; ``dark``: hematoxylin of the nucleus;
#: ``rim``/``nucleolus``: vesicular chromatin; ``cyto_h``/``cyto_e``: cytoplasm stains; ``mem_e``/``mem_w``: cell
#: borders; ``fibre``: collagen fibre modulation.
_CELL_TYPES: dict[str, dict[str, float]] = {
    "stroma": dict(spacing=10.0, stretch=3.4, nuc_r=1.8, nuc_frac=0.3, pleo=0.15, irr=0.03, dark=0.9, rim=0.0,
                   nucleolus=0.0, cyto_h=0.04, cyto_e=0.6, mem_e=0.0, mem_w=0.0, fibre=0.45),
    "epithelium": dict(spacing=9.0, stretch=1.0, nuc_r=2.5, nuc_frac=0.95, pleo=0.12, irr=0.04, dark=0.95, rim=0.0,
                       nucleolus=0.0, cyto_h=0.06, cyto_e=0.36, mem_e=0.25, mem_w=0.6, fibre=0.0),
    "lymphoid": dict(spacing=6.5, stretch=1.0, nuc_r=2.8, nuc_frac=0.97, pleo=0.08, irr=0.03, dark=1.3, rim=0.0,
                     nucleolus=0.0, cyto_h=0.05, cyto_e=0.2, mem_e=0.0, mem_w=0.0, fibre=0.0),
    "fat": dict(spacing=38.0, stretch=1.1, nuc_r=1.6, nuc_frac=0.06, pleo=0.1, irr=0.02, dark=0.9, rim=0.0,
                nucleolus=0.0, cyto_h=0.0, cyto_e=0.015, mem_e=0.55, mem_w=1.1, fibre=0.0),
    "tumor": dict(spacing=14.0, stretch=1.15, nuc_r=4.5, nuc_frac=0.97, pleo=0.35, irr=0.1, dark=0.85, rim=0.75,
                  nucleolus=0.9, cyto_h=0.14, cyto_e=0.24, mem_e=0.12, mem_w=0.6, fibre=0.0),
}
#: type-map codes: stroma in three fibre orientations, then the other types; 255 is background
_T_STROMA, _T_EPI, _T_LYMPH, _T_FAT, _T_TUMOR = (0, 1, 2), 3, 4, 5, 6
_TYPE_NAME = {0: "stroma", 1: "stroma", 2: "stroma", 3: "epithelium", 4: "lymphoid", 5: "fat", 6: "tumor"}


class _CellRenderer:
    """Renders level-0 bands of a ``cells`` slide from its type map (one cell type per pixel)."""

    def __init__(self, seed: int, mpp: float, type_map: np.ndarray, mask_px: float, tissue_soft: np.ndarray,
                 h_od: np.ndarray, e_od: np.ndarray, strength: np.ndarray, background: np.ndarray,
                 base_angle: float):
        self.seed, self.mpp, self.types, self.mask_px = seed, mpp, type_map, mask_px
        self.tissue_soft, self.h_od, self.e_od, self.strength = tissue_soft, h_od, e_od, strength
        self.background = background
        self.angles = {code: base_angle + code * np.pi / 3 for code in _T_STROMA}
        self.angles.update({_T_EPI: 0.0, _T_LYMPH: 0.0, _T_FAT: base_angle, _T_TUMOR: 0.3})

    def _cells(self, code: int, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hematoxylin and eosin concentrations of cell type ``code`` at the µm points ``X``, ``Y`` (1-D)."""
        p = _CELL_TYPES[_TYPE_NAME[code]]
        s, a = p["spacing"], self.angles[code]
        ca, sa = math.cos(a), math.sin(a)
        u = (X * ca + Y * sa) / (s * p["stretch"])
        v = (Y * ca - X * sa) / s
        salt = (int(self.seed) * 7919 + code * 104729) & 0xFFFFFFFF
        i0, j0 = np.floor(u - 0.5).astype(np.int64), np.floor(v - 0.5).astype(np.int64)
        li, lj = int(i0.min()), int(j0.min())
        ni, nj = int(i0.max()) - li + 2, int(j0.max()) - lj + 2
        gi, gj = np.meshgrid(np.arange(li, li + ni), np.arange(lj, lj + nj))
        jit = np.float32(0.34)
        fx = (gi + 0.5 + jit * (2 * _hash01(gi, gj, salt) - 1)).astype(np.float32).ravel()
        fy = (gj + 0.5 + jit * (2 * _hash01(gi, gj, salt + 1) - 1)).astype(np.float32).ravel()
        base = (j0 - lj) * ni + (i0 - li)
        ks = np.stack([base, base + 1, base + ni, base + ni + 1])  # the 2 x 2 nearest lattice points
        dx = (u[None] - fx[ks]) * np.float32(p["stretch"])  # across-cell units: isotropic in µm / s
        dy = v[None] - fy[ks]
        d2 = dx * dx + dy * dy
        pick = np.argmin(d2, axis=0)[None]
        best = np.take_along_axis(d2, pick, 0)[0]
        lo01, hi01 = np.minimum(d2[0], d2[1]), np.maximum(d2[0], d2[1])
        lo23, hi23 = np.minimum(d2[2], d2[3]), np.maximum(d2[2], d2[3])
        second = np.minimum(np.maximum(lo01, lo23), np.minimum(hi01, hi23))
        owner = np.take_along_axis(ks, pick, 0)[0]
        bdx, bdy = np.take_along_axis(dx, pick, 0)[0], np.take_along_axis(dy, pick, 0)[0]
        del ks, dx, dy, d2
        h_size, h_dark, h_has, h_phase = (_hash01(gi, gj, salt + k).ravel()[owner] for k in (2, 3, 4, 5))
        d1 = np.sqrt(best) * np.float32(s)  # µm to the nucleus centre (elongated along the cells in stroma)
        # nucleus: radius per cell, irregular outline cos(3 phi), anti-aliased over one pixel
        r = np.float32(p["nuc_r"]) * (1 + np.float32(p["pleo"]) * (2 * h_size - 1))
        if p["irr"] > 0:
            cphi = bdx / np.maximum(np.sqrt(best), 1e-6)
            cos3 = 4 * cphi ** 3 - 3 * cphi
            r = r * (1 + np.float32(p["irr"]) * np.cos(np.float32(2 * np.pi) * h_phase) * cos3)
        if p["stretch"] > 1:  # spindle nuclei: distance along the cell shrunk
            d1 = np.sqrt((bdx / np.float32(p["stretch"] ** 0.5)) ** 2 + bdy ** 2) * np.float32(s)
        inner = r - d1
        nuc = np.clip(inner / np.float32(self.mpp) + 0.5, 0, 1) * (h_has < p["nuc_frac"])
        chrom = np.float32(p["dark"]) * (0.8 + 0.4 * h_dark)
        if p["rim"] > 0:  # vesicular: dark rim, pale centre, nucleolus
            rim = np.exp(-((inner - 0.6) / 0.9) ** 2)
            chrom = chrom * (0.45 + p["rim"] * rim) + np.float32(p["nucleolus"]) * (d1 < 0.9)
        c_h = np.float32(p["cyto_h"]) + nuc * chrom
        c_e = np.float32(p["cyto_e"]) * (1 - 0.7 * nuc)
        if p["fibre"] > 0:  # wavy collagen fibres across the cells, and bundles of different pinks
            wave = np.sin(v * np.float32(2 * np.pi * s / 2.8) + 1.8 * np.sin(u * np.float32(2.1) + 6.283 * h_phase))
            c_e = c_e * (1 - p["fibre"] + p["fibre"] * (0.5 + 0.5 * wave) ** 2 * 2) * (0.75 + 0.5 * h_size)
        if p["mem_e"] > 0:
            gap = (np.sqrt(second) - np.sqrt(best)) * np.float32(s)  # ~2x the distance to the cell border, µm
            mem = np.clip(1 - gap / np.float32(2 * p["mem_w"]), 0, 1)
            c_e = c_e + np.float32(p["mem_e"]) * mem
            c_h = c_h + np.float32(0.03) * mem
        return c_h, c_e

    def render_band(self, y0: int, rows: int, width: int) -> np.ndarray:
        alpha = _sample_bilinear(self.tissue_soft, self.mask_px, y0, rows, width)
        types = _sample_nearest(self.types, self.mask_px, y0, rows, width)
        grain = _rng(self.seed, 0x6A1, y0).standard_normal((rows, width), dtype=np.float32)
        out = (np.float32(255.0) * np.exp(-self.background) + 0.5 + 1.5 * grain[..., None]).astype(np.float32)
        inside = np.flatnonzero(alpha.ravel() > 0.002)
        if inside.size:
            t_in = types.ravel()[inside]
            c_h = np.zeros(inside.size, dtype=np.float32)
            c_e = np.zeros(inside.size, dtype=np.float32)
            yy = (y0 + inside // width + 0.5).astype(np.float32) * np.float32(self.mpp)
            xx = (inside % width + 0.5).astype(np.float32) * np.float32(self.mpp)
            present = np.flatnonzero(np.bincount(t_in, minlength=256)[:255])
            for code in present:
                sel = np.flatnonzero(t_in == code)
                c_h[sel], c_e[sel] = self._cells(int(code), xx[sel], yy[sel])
            g, a = grain.ravel()[inside], alpha.ravel()[inside]
            c_h *= (1 + 0.12 * g) * a * self.strength[0]
            c_e *= (1 + 0.06 * g) * a * self.strength[1]
            flat = out.reshape(-1, 3)
            for ch in range(3):
                od = self.background[ch] + c_h * self.h_od[ch] + c_e * self.e_od[ch]
                flat[inside, ch] = np.float32(255.0) * np.exp(-od) + 0.5 + 1.5 * g
        return np.clip(out, 0, 255).astype(np.uint8)


def _pick_shape(rng: np.random.Generator, weights: tuple[float, float, float]) -> str:
    w = np.asarray(weights, dtype=np.float64)
    return ("single", "streak", "island")[int(rng.choice(3, p=w / w.sum()))]


def _draw_shape(rng: np.random.Generator, mask: np.ndarray, shape: str, cx: float, cy: float, cell: float) -> None:
    """Draw an ambiguous structure centred at ``(cx, cy)`` (mask px) of a grid cell of ``cell`` mask px."""
    if shape == "single":
        _disc(mask, cx, cy, cell * rng.uniform(0.3, 0.5))
    elif shape == "streak":
        length, ang = cell * rng.uniform(2, 6), rng.uniform(0, np.pi)
        dx, dy = 0.5 * length * math.cos(ang), 0.5 * length * math.sin(ang)
        _capsule(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 0.5 * cell * rng.uniform(0.4, 0.8))
    else:
        _lobulated(rng, mask, cx, cy, cell * float(rng.choice([1.0, 2.0, 3.0])) * rng.uniform(0.8, 1.1), (1, 3))


def _cores(rng: np.random.Generator, shape: tuple[int, int], n: int, salt: int) -> np.ndarray:
    """Needle-core tissue: ``n`` long, slightly bent strips side by side with ragged edges (mask px)."""
    mh, mw = shape
    ys, xs = np.arange(mh) + 0.5, np.arange(mw) + 0.5
    angle = rng.uniform(0, np.pi)
    ca, sa = math.cos(angle), math.sin(angle)
    span, across = abs(mw * ca) + abs(mh * sa), abs(mw * sa) + abs(mh * ca)
    pitch = 0.85 * min(across, span) / n
    edge = _noise_grid(xs, ys, 0.25 * pitch, salt) + 0.5 * _noise_grid(xs, ys, 0.08 * pitch, salt + 1) - 0.75
    out = np.zeros(shape, dtype=bool)
    for k in range(n):
        a = angle + rng.normal(0, 0.06)
        c, s_ = math.cos(a), math.sin(a)
        off = (k - (n - 1) / 2) * pitch
        cx = mw / 2 - off * sa + rng.normal(0, 0.02 * pitch)
        cy = mh / 2 + off * ca + rng.normal(0, 0.02 * pitch)
        half_len = rng.uniform(0.3, 0.44) * span
        half_w = rng.uniform(0.28, 0.4) * pitch
        u = (xs[None, :] - cx) * c + (ys[:, None] - cy) * s_
        v = (ys[:, None] - cy) * c - (xs[None, :] - cx) * s_
        v = v - 0.6 * half_w * np.sin(u / half_len * rng.uniform(1, 2.5) + rng.uniform(0, 2 * np.pi))
        d = np.sqrt((u / half_len) ** 6 + (v / half_w) ** 2) + 0.45 * edge
        out |= d < 1
    return out


def generate_cells_slide(path: str | os.PathLike, seed: int, config: CellsFamilyConfig | None = None,
                         relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write one ``cells`` slide (TIFF, ASAP XML, GeoJSON, truth ``.npz``) and return its manifest record.

    Raises:
        ConfigError: a bad path, seed or config.
    """
    from scipy.ndimage import binary_dilation, distance_transform_edt, gaussian_filter

    path, cfg = Path(path), config if config is not None else CellsFamilyConfig()
    _check_slide_args("generate_cells_slide", path, seed)
    cfg.validate()
    start = time.perf_counter()
    rng = _rng(seed, 0xCE11)
    w0, h0 = cfg.level0_size
    field_w, field_h = cfg.width * cfg.grid_mpp, cfg.height * cfg.grid_mpp  # µm
    mask_um = max(cfg.mask_um, max(field_w, field_h) / 4096)
    mh, mw = int(math.ceil(field_h / mask_um)), int(math.ceil(field_w / mask_um))
    mask_px = mask_um / cfg.mpp  # level-0 px per mask px
    cell = cfg.patch_size * cfg.grid_mpp / mask_um  # grid cell in mask px
    h_od, e_od, strength = _stain(rng, cfg.stain_jitter, cfg.stain_strength)
    background = np.clip(rng.uniform(0.02, 0.07) + rng.normal(0, 0.01, 3), 0.005, None).astype(np.float32)
    salts = [int(v) for v in rng.integers(0, 2**32, 8)]
    tissue = _cores(rng, (mh, mw), int(rng.integers(cfg.n_cores[0], cfg.n_cores[1] + 1)), salts[0])
    depth = distance_transform_edt(tissue)
    # lesions: lobulated masses or clusters of small nests, traced into annotation polygons
    region = np.zeros((mh, mw), dtype=bool)
    n_tumors = 0 if cfg.tumor_free else int(rng.integers(cfg.tumor_regions[0], cfg.tumor_regions[1] + 1))
    for _ in range(n_tumors):
        radius = cell * rng.uniform(*cfg.tumor_radius_cells)
        radius = min(radius, 0.9 * float(depth.max()))
        away = ~binary_dilation(region, iterations=max(int(cell), 1)) if region.any() else np.ones_like(region)
        spot = _place(rng, tissue & away, depth, 0.8 * radius) or _place(rng, tissue & away, None, 0)
        if spot is None:
            continue
        if rng.random() < 0.65:
            _lobulated(rng, region, spot[0], spot[1], radius)
        else:
            for _ in range(int(rng.integers(3, 9))):
                ang, dist = rng.uniform(0, 2 * np.pi), radius * math.sqrt(rng.uniform(0, 1))
                _disc(region, spot[0] + dist * math.cos(ang), spot[1] + dist * math.sin(ang),
                      cell * rng.uniform(0.5, 1.3))
    region &= tissue
    polygons = _traced_polygons(region, mask_px, (0.4 * cell * mask_px) ** 2, "Tumor")
    region = rasterize_annotations(polygons, (mh, mw), mask_px) == 2 if polygons else np.zeros((mh, mw), bool)
    tissue |= region
    # normal composition: argmax of weighted value noise (stroma in three fibre orientations)
    ys, xs = (np.arange(mh) + 0.5) * mask_um, (np.arange(mw) + 0.5) * mask_um

    def noise2(scale: float, salt: int) -> np.ndarray:  # two octaves: rounder level sets than one lattice
        return 0.65 * _noise_grid(xs, ys, scale, salt) + 0.35 * _noise_grid(xs, ys, 0.41 * scale, salt + 1)

    stroma = 0.5 * noise2(150.0, salts[1]) + 0.22
    epi = 0.9 * noise2(120.0, salts[2])
    lymph = 1.5 * noise2(60.0, salts[3]) - 0.5
    fat = 1.4 * noise2(170.0, salts[4]) - 0.45
    types = np.argmax(np.stack([stroma, epi, lymph, fat]), axis=0).astype(np.uint8)
    orient = np.minimum((_noise_grid(xs, ys, 180.0, salts[5]) * 3).astype(np.uint8), 2)
    types = np.where(types == 0, orient, types + 2).astype(np.uint8)
    look = region.copy()
    mimic_centers, mimic_kind, mimic_shape = [], [], []
    # tumor rendered as normal (inside lesions and across their edges); ground truth stays tumor
    tdepth = distance_transform_edt(region)
    for _ in range(cfg.false_normal * len(polygons)):
        at_edge = rng.random() < 0.4
        allowed = region & ((tdepth < cell) if at_edge else (tdepth >= 0.5 * cell))
        spot = _place(rng, allowed, None, 0) or _place(rng, region, None, 0)
        if spot is None:
            break
        shape = _pick_shape(rng, cfg.shape_weights)
        struct = np.zeros_like(region)
        _draw_shape(rng, struct, shape, spot[0], spot[1], cell)
        struct &= region
        look &= ~struct
        types[struct] = _T_EPI if rng.random() < 0.7 else _T_STROMA[int(rng.integers(3))]
        mimic_centers.append((spot[0] * mask_px, spot[1] * mask_px))
        mimic_kind.append("false_normal")
        mimic_shape.append(shape)
    # normal tissue rendered as tumor, away from the lesions; ground truth normal (not annotated)
    free = tissue & ~binary_dilation(region, iterations=max(int(1.5 * cell), 1)) if region.any() else tissue.copy()
    for _ in range(cfg.false_tumor):
        shape = _pick_shape(rng, cfg.shape_weights)
        spot = _place(rng, free, depth, 0.3 * cell)
        if spot is None:
            break
        struct = np.zeros_like(region)
        _draw_shape(rng, struct, shape, spot[0], spot[1], cell)
        struct &= tissue & ~region
        look |= struct
        free &= ~binary_dilation(struct, iterations=max(int(cell), 1))
        mimic_centers.append((spot[0] * mask_px, spot[1] * mask_px))
        mimic_kind.append("false_tumor")
        mimic_shape.append(shape)
    types[look] = _T_TUMOR
    types[~tissue] = 255
    tissue_soft = gaussian_filter(tissue.astype(np.float32), max(0.6, 0.8 / mask_um))
    renderer = _CellRenderer(seed, cfg.mpp, types, mask_px, tissue_soft, h_od, e_od, strength, background,
                             float(rng.uniform(0, np.pi)))
    d = max(int(round(cfg.truth_um / cfg.mpp)), 1)
    shape = (-(-h0 // d), -(-w0 // d))
    t_tissue = _mask_at_truth(tissue, mask_px, d, shape)
    t_tumor = rasterize_annotations(polygons, shape, d) == 2 if polygons else np.zeros(shape, bool)
    t_tissue |= t_tumor  # tumor is tissue (the two rasters may differ by a pixel along the outline)
    t_look = _mask_at_truth(look, mask_px, d, shape) & t_tissue
    cell_px = cfg.patch_size * cfg.grid_mpp / cfg.mpp
    kinds = np.array(mimic_kind, dtype="<U12").reshape(-1)
    centers = np.array(mimic_centers, dtype=np.float64).reshape(-1, 2)
    truth = {"tissue": t_tissue, "tumor": t_tumor, "tumor_looking": t_look, "downsample": np.int64(d),
             "patch_size": np.int64(round(cell_px)),
             "normal_looking_cells": _grid_cells(t_tumor, t_look, d, cell_px, w0, h0),
             "tumor_point_centers": centers[kinds == "false_tumor"].reshape(-1, 2),
             "n_tumor_polygons": np.int64(len(polygons)), "seed": np.int64(seed),
             "config_json": np.array(_config_json(cfg)), "family": np.array("cells"),
             "h_od": h_od, "e_od": e_od, "stain_strength": strength, "mimic_centers": centers,
             "mimic_kind": kinds, "mimic_shape": np.array(mimic_shape, dtype="<U8").reshape(-1)}
    record = _write_slide_files(path, seed, _writer_config(w0, h0, cfg.mpp, cfg.tile_size, cell_px,
                                                           cfg.jpeg_quality, d), background, renderer.render_band,
                                polygons, truth, Path(relative_to) if relative_to is not None else None, cfg, "cells")
    logger.info("Cells slide %s (%dx%d at %g µm/px, seed %d) written in %.1f s.", path, w0, h0, cfg.mpp, seed,
                time.perf_counter() - start)
    return record


# ---------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------


def generate_family_dataset(out_dir: str | os.PathLike, family: str = "texture", n_train: int = 4, n_val: int = 2,
                            n_test: int = 3, seed: int = 0, overwrite: bool = False,
                            tumor_free_fraction: float = 1 / 3, mpps: tuple[float, ...] = (0.25, 0.5, 1.0),
                            **config_overrides: Any) -> Path:
    """Write a dataset of one slide family and its ``manifest.json`` (the layout of
    :func:`monai_wsi_ext.testing.synthetic.generate_dataset`).

    Slides go to ``<out_dir>/slides/<split>_<index>.tif`` with their sidecars; each slide's seed comes from
    ``(seed, split, index, family)``. In each split the last ``round(n * tumor_free_fraction)`` slides are
    tumor-free (at least one slide of a split keeps tumor while the fraction is below 1). ``texture`` slides of the
    train and validation splits are made of one half of the sources and test slides of the other half; ``cells``
    slides take their mpp from ``mpps`` in turn (shifted by the seed), so every split of two slides or more mixes
    resolutions.

    Args:
        out_dir: output folder (created).
        family: ``synthetic`` (delegates to :func:`~monai_wsi_ext.testing.synthetic.generate_dataset`; then
            ``config_overrides`` are :class:`~monai_wsi_ext.testing.synthetic.SyntheticSlideConfig` fields and the
            two arguments below are not used), ``texture`` or ``cells``.
        n_train: number of training slides.
        n_val: number of validation slides.
        n_test: number of test slides.
        seed: dataset seed.
        overwrite: rewrite slides already present (else a slide written with the same seed and settings is kept).
        tumor_free_fraction: share of tumor-free slides per split (``texture`` and ``cells``).
        mpps: level-0 µm/px values the ``cells`` slides cycle through.
        config_overrides: fields of :class:`TextureFamilyConfig` or :class:`CellsFamilyConfig`
            (e.g. ``width=2048``, ``source_dir=...``).

    Returns:
        Path of ``manifest.json``.

    Raises:
        ConfigError: an unknown family or config field, bad counts, or (``texture``) no source texture.
    """
    if family not in FAMILIES:
        raise ConfigError(f"generate_family_dataset: unknown family {family!r}; known: {list(FAMILIES)}.")
    if family == "synthetic":
        return synthetic.generate_dataset(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                                          overwrite=overwrite, **config_overrides)
    config_cls = TextureFamilyConfig if family == "texture" else CellsFamilyConfig
    known = {f.name for f in dataclasses.fields(config_cls)}
    per_slide = {"tumor_free", "source_part"} | ({"mpp"} if family == "cells" else set())
    unknown = sorted(set(config_overrides) - (known - per_slide))
    if unknown:
        raise ConfigError(f"generate_family_dataset: unknown or per-slide {config_cls.__name__} field(s) {unknown}; "
                          f"allowed: {sorted(known - per_slide)} (per-slide values come from tumor_free_fraction"
                          f"{' and mpps' if family == 'cells' else ''}).")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in counts.items():
        _check_int("generate_family_dataset", f"n_{name}", n, 0)
    _check_int("generate_family_dataset", "seed", seed, 0)
    _check_range("generate_family_dataset", "tumor_free_fraction", tumor_free_fraction, 0.0, 1.0)
    mpps = tuple(float(m) for m in (mpps if isinstance(mpps, (list, tuple)) else [mpps]))
    if family == "cells" and (not mpps or min(mpps) <= 0):
        raise ConfigError(f"generate_family_dataset: `mpps` must be positive µm/px values, got {mpps!r}.")
    base = config_cls(**config_overrides)
    if family == "texture":  # a clear error naming the folder before any slide is written
        _crc_files(Path(base.source_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, index = [], 0
    for split_index, split in enumerate(_SPLITS):
        for i, free in enumerate(_tumor_free_flags(counts[split], tumor_free_fraction)):
            slide_seed = int(np.random.SeedSequence([int(seed), split_index, i, _FAMILY_SALT[family]])
                             .generate_state(1)[0])
            path = out_dir / "slides" / f"{split}_{i:03d}.tif"
            if family == "texture":
                cfg = dataclasses.replace(base, tumor_free=free, source_part="test" if split == "test" else "train")
                make = generate_texture_slide
                wcfg = _writer_config(cfg.width, cfg.height, cfg.mpp, cfg.tile_size, cfg.patch_size,
                                      cfg.jpeg_quality, cfg.truth_downsample)
            else:
                cfg = dataclasses.replace(base, tumor_free=free, mpp=mpps[(index + int(seed)) % len(mpps)])
                make = generate_cells_slide
                d = max(int(round(cfg.truth_um / cfg.mpp)), 1)
                wcfg = _writer_config(*cfg.level0_size, cfg.mpp, cfg.tile_size,
                                      cfg.patch_size * cfg.grid_mpp / cfg.mpp, cfg.jpeg_quality, d)
            index += 1
            record = None if overwrite else _existing(path, slide_seed, family, cfg, wcfg, out_dir)
            if record is None:
                record = make(path, slide_seed, cfg, relative_to=out_dir)
            else:
                logger.info("%s slide %s already present; kept.", family, path)
            record["split"] = split
            records.append(record)
    manifest = {
        "name": f"{family} slide family (monai_wsi_ext.testing.families)",
        "version": 1,
        "family": family,
        "seed": int(seed),
        "config": base.to_dict(),
        "tumor_free_fraction": float(tumor_free_fraction),
        **({"mpps": list(mpps)} if family == "cells" else {}),
        "splits": {s: [r["id"] for r in records if r["split"] == s] for s in _SPLITS},
        "slides": records,
    }
    return write_json_atomic(out_dir / "manifest.json", manifest)
