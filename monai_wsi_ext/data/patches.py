"""Patch and slide data: transforms (the paper's augmentation, a deterministic eval transform, optional Macenko
stain normalisation), a patch dataset over patch tables, a balanced sampler, per-slide patch sources with
replayable augmentation (for end-to-end training) and prefetching batch iterators (for feature extraction).

Images leave the transforms as float32 ``(3, h, w)`` tensors in [0, 1].
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Randomizable
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed
from torch.utils.data import Dataset, WeightedRandomSampler

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.prep.grid import PatchLabel
from monai_wsi_ext.prep.prepare import PreparedSlide, load_prepared_slides
from monai_wsi_ext.io.wsi import Slide, open_slide

__all__ = [
    "PatchKeys",
    "PaperAugment",
    "PaperAugmentd",
    "adjust_colour_batch",
    "EvalTransform",
    "StainNormalize",
    "make_patch_transform",
    "SlideCache",
    "PatchDataset",
    "balanced_sampler",
    "load_datalist",
    "label_budget",
    "SlidePatchSource",
    "E2ESlideDataset",
    "slide_item",
]

logger = logging.getLogger(__name__)


class PatchKeys(str, Enum):
    """Keys of patch samples."""

    IMAGE = "image"
    LABEL = "label"
    SLIDE_ID = "slide_id"
    ROW = "row"
    COL = "col"


def _to_float_chw(img) -> torch.Tensor:
    """HWC uint8 numpy (or CHW tensor) -> float32 CHW tensor in [0, 1]."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.ndim == 3 and t.shape[-1] in (3, 4) and t.shape[0] not in (3, 4):
            t = t.permute(2, 0, 1)
    else:
        arr = np.asarray(img)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[..., :3].transpose(2, 0, 1)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t[:3]
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()


def _center_crop(t: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None:
        return t
    h, w = t.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"`crop_size` {size} is larger than the patch ({h}x{w}).")
    top, left = (h - size) // 2, (w - size) // 2
    return t[..., top:top + size, left:left + size]


_GRAY = (0.2989, 0.587, 0.114)  # torchvision's luminance weights


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * img + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _gray(img: torch.Tensor) -> torch.Tensor:
    w = img.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def adjust_colour_batch(img: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor,
                        brightness: torch.Tensor, sharpness: torch.Tensor) -> torch.Tensor:
    """Saturation, contrast, brightness and sharpness adjustments of a float (n, 3, h, w) batch in [0, 1], each with
    its own factor per image, applied in that order with the formulas of torchvision's ``adjust_*`` functions
    (blend with grayscale / mean gray / black / a 3x3 smoothed copy), vectorised over the batch."""
    f = [t.to(img).view(-1, 1, 1, 1) for t in (saturation, contrast, brightness, sharpness)]
    img = _blend(img, _gray(img), f[0])
    img = _blend(img, _gray(img).mean(dim=(2, 3), keepdim=True), f[1])
    img = (img * f[2]).clamp_(0.0, 1.0)
    if img.shape[-1] > 2 and img.shape[-2] > 2:
        k = img.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
        blurred = torch.nn.functional.conv2d(img.reshape(-1, 1, *img.shape[-2:]), k.view(1, 1, 3, 3))
        degenerate = img.clone()
        degenerate[..., 1:-1, 1:-1] = blurred.reshape(img.shape[0], 3, *blurred.shape[-2:])
        img = _blend(img, degenerate, f[3])
    return img


# scikit-image's H&E-DAB stain vectors (Ruifrok & Johnston): optical density = stains @ _RGB_FROM_HED
_RGB_FROM_HED = np.asarray(rgb_from_hed, np.float64)
_HED_FROM_RGB = np.asarray(hed_from_rgb, np.float64)
COLOUR_SPACES = ("rgb", "hed")


def channel_colour_batch(img: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, space: str = "rgb"
                         ) -> torch.Tensor:
    """The review article's colour augmentation: each channel multiplied by its own factor and shifted by its own
    amount, per image, of a float (n, 3, h, w) batch in [0, 1].

    Args:
        img: the batch.
        shift: (n, 3) additive shifts (RGB intensity, or stain optical density for ``hed``).
        scale: (n, 3) multiplicative factors.
        space: ``rgb`` (on the intensities) or ``hed`` (on the haematoxylin, eosin and DAB concentrations of the
            colour deconvolution, then back to RGB).
    """
    shift, scale = shift.to(img).view(-1, 3, 1, 1), scale.to(img).view(-1, 3, 1, 1)
    if space == "rgb":
        return (img * scale + shift).clamp_(0.0, 1.0)
    if space != "hed":
        raise ConfigError(f"`colour_space` must be one of {COLOUR_SPACES}, got {space!r}.")
    od = -torch.log(img.clamp(min=1e-6))
    to_hed, to_rgb = (img.new_tensor(m) for m in (_HED_FROM_RGB, _RGB_FROM_HED))
    stains = torch.einsum("nchw,cd->ndhw", od, to_hed) * scale + shift
    return torch.exp(-torch.einsum("ndhw,dc->nchw", stains, to_rgb)).clamp_(0.0, 1.0)


class PaperAugment(Randomizable):
    """The training augmentation of Takahama et al.: random ``crop_size`` crop, rotation by 0/90/180/270,
    left-right flip, and saturation, contrast, brightness and sharpness each scaled by a factor drawn from
    ``factor_range`` (torchvision's ``adjust_*`` formulas, see :func:`adjust_colour_batch`); optionally followed
    by the review article's per-channel colour augmentation (:func:`channel_colour_batch`: a factor from
    ``[1 - colour_scale, 1 + colour_scale]`` and a shift from ``[-colour_shift, colour_shift]`` per channel, in RGB
    or HED space). With both at 0 (the default) no extra random number is drawn, so the paper's draws stay as they
    were.

    All randomness is drawn from a numpy ``RandomState``, so ``set_random_state(seed)`` followed by a call, or
    :meth:`apply_batch` with that seed, reproduces the same pixels exactly — end-to-end training relies on it to
    replay a patch's augmentation when it re-reads the patch for the second encoder pass. :meth:`apply_batch`
    does the colour work for a whole batch at once (per-patch calls cost ~10x more on CPU).

    Args:
        crop_size: side of the random crop (None: no crop).
        factor_range: range of the colour factors (paper: 0.75-1.25).
        colour_shift: half-width of the per-channel additive shift (0: none).
        colour_scale: half-width of the per-channel multiplicative factor around 1 (0: none).
        colour_space: ``rgb`` or ``hed``.
    """

    def __init__(self, crop_size: int | None = 224, factor_range: tuple[float, float] = (0.75, 1.25),
                 colour_shift: float = 0.0, colour_scale: float = 0.0, colour_space: str = "rgb"):
        self.crop_size = crop_size
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        if colour_space not in COLOUR_SPACES:
            raise ConfigError(f"`colour_space` must be one of {COLOUR_SPACES}, got {colour_space!r}.")
        if float(colour_shift) < 0 or not 0 <= float(colour_scale) < 1:
            raise ConfigError(f"`colour_shift` must be >= 0 and `colour_scale` in [0, 1), got {colour_shift}, "
                              f"{colour_scale}.")
        self.colour_shift, self.colour_scale, self.colour_space = float(colour_shift), float(colour_scale), colour_space

    def _draw(self, rng: np.random.RandomState, h: int, w: int) -> dict:
        cs = self.crop_size
        if cs and cs > min(h, w):
            raise ValueError(f"`crop_size` {cs} is larger than the patch ({h}x{w}).")
        lo, hi = self.factor_range
        p = {"top": int(rng.randint(0, h - cs + 1)) if cs else 0,
             "left": int(rng.randint(0, w - cs + 1)) if cs else 0,
             "k": int(rng.randint(0, 4)), "flip": bool(rng.rand() < 0.5), "factors": rng.uniform(lo, hi, size=4)}
        if self.colour_shift or self.colour_scale:
            p["shift"] = rng.uniform(-self.colour_shift, self.colour_shift, size=3)
            p["scale"] = rng.uniform(1.0 - self.colour_scale, 1.0 + self.colour_scale, size=3)
        return p

    def randomize(self, data=None) -> None:  # parameters are drawn inside __call__/apply_batch
        pass

    def _geometry(self, t: torch.Tensor, p: dict) -> torch.Tensor:
        if self.crop_size:
            t = t[..., p["top"]:p["top"] + self.crop_size, p["left"]:p["left"] + self.crop_size]
        t = torch.rot90(t, p["k"], dims=(-2, -1))
        return torch.flip(t, dims=(-1,)) if p["flip"] else t

    def apply_batch(self, raw, seeds=None) -> torch.Tensor:
        """Augment a batch of ``(n, h, w, 3)`` uint8 patches (or ``(n, 3, h, w)`` tensors); patch ``i`` uses a
        ``RandomState(seeds[i])`` (or this transform's state when ``seeds`` is None)."""
        imgs = [_to_float_chw(r) for r in raw]
        if not imgs:
            return torch.zeros(0)
        params = []
        for i, t in enumerate(imgs):
            rng = self.R if seeds is None else np.random.RandomState(int(seeds[i]) % (2**32))
            params.append(self._draw(rng, *t.shape[-2:]))
        batch = torch.stack([self._geometry(t, p) for t, p in zip(imgs, params)])
        fac = torch.as_tensor(np.stack([p["factors"] for p in params]), dtype=torch.float32)
        out = adjust_colour_batch(batch, *fac.unbind(1))
        if "shift" in params[0]:
            shift, scale = (torch.as_tensor(np.stack([p[k] for p in params]), dtype=torch.float32)
                            for k in ("shift", "scale"))
            out = channel_colour_batch(out, shift, scale, self.colour_space)
        return out.contiguous()

    def __call__(self, img) -> torch.Tensor:
        return self.apply_batch([img])[0]


class PaperAugmentd(Randomizable):
    """Dictionary version of :class:`PaperAugment` (applied to ``keys``)."""

    def __init__(self, keys: Sequence[str] = ("image",), crop_size: int | None = 224,
                 factor_range: tuple[float, float] = (0.75, 1.25)):
        self.keys = list(keys)
        self.aug = PaperAugment(crop_size, factor_range)

    def set_random_state(self, seed=None, state=None):
        self.aug.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:  # randomness lives in the wrapped transform
        pass

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for k in self.keys:
            d[k] = self.aug(d[k])
        return d


PaperAugmentD = PaperAugmentDict = PaperAugmentd


class EvalTransform:
    """Deterministic eval transform: the centre ``crop_size`` crop (the same field of view the random training
    crop has) and scaling to [0, 1]. No colour change."""

    def __init__(self, crop_size: int | None = 224):
        self.crop_size = crop_size

    def set_random_state(self, seed=None, state=None):  # deterministic; accepted for a uniform interface
        return self

    def __call__(self, img) -> torch.Tensor:
        return _center_crop(_to_float_chw(img), self.crop_size).contiguous()

    def apply_batch(self, raw, seeds=None) -> torch.Tensor:
        """The transform of a batch of ``(n, h, w, 3)`` uint8 patches in one numpy pass (the same float32 values
        as per-patch calls). numpy rather than torch: per-patch torch ops start OpenMP parallel regions whose
        spinning threads fight the slide decoder threads while ``SlidePatchSource.iter_batches`` reads ahead,
        which made that path 10x slower than the read itself on 2 cores."""
        if not isinstance(raw, np.ndarray) and len(raw) and all(isinstance(r, np.ndarray) for r in raw):
            raw = np.stack(raw) if len({r.shape for r in raw}) == 1 else raw
        if not (isinstance(raw, np.ndarray) and raw.ndim == 4 and raw.dtype == np.uint8 and raw.shape[-1] in (3, 4)):
            return torch.stack([self(r) for r in raw]) if len(raw) else torch.zeros(0)
        n, h, w = raw.shape[:3]
        if self.crop_size is not None:
            if self.crop_size > min(h, w):
                raise ValueError(f"`crop_size` {self.crop_size} is larger than the patch ({h}x{w}).")
            top, left = (h - self.crop_size) // 2, (w - self.crop_size) // 2
            raw = raw[:, top:top + self.crop_size, left:left + self.crop_size]
        out = np.empty((n, 3, raw.shape[1], raw.shape[2]), np.float32)
        np.divide(raw[..., :3].transpose(0, 3, 1, 2), np.float32(255.0), out=out)
        return torch.from_numpy(out)


class StainNormalize:
    """Macenko stain normalisation with MONAI's ``NormalizeHEStains`` on HWC uint8 patches.

    Patches with too little stained tissue for the stain estimate (MONAI raises) pass through unchanged.
    """

    def __init__(self, tli: float = 240, alpha: float = 1, beta: float = 0.15):
        from monai.apps.pathology.transforms import NormalizeHEStains

        self.norm = NormalizeHEStains(tli=tli, alpha=alpha, beta=beta)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.norm(np.asarray(img)[..., :3]), dtype=np.uint8)
        except ValueError:
            return np.asarray(img)[..., :3]


class _Chain:
    def __init__(self, pre, main):
        self.pre, self.main = pre, main
        if hasattr(main, "apply_batch"):
            self.apply_batch = lambda raw, seeds=None: main.apply_batch([pre(r) for r in raw], seeds)

    def set_random_state(self, seed=None, state=None):
        self.main.set_random_state(seed, state)
        return self

    def __call__(self, img):
        return self.main(self.pre(img))


def make_patch_transform(train: bool, crop_size: int | None = 224, stain_normalize: bool = False,
                         factor_range: tuple[float, float] = (0.75, 1.25), colour_shift: float = 0.0,
                         colour_scale: float = 0.0, colour_space: str = "rgb"):
    """The patch transform: :class:`PaperAugment` for training (with the optional per-channel colour augmentation),
    :class:`EvalTransform` otherwise, optionally after :class:`StainNormalize`. The result has
    ``set_random_state(seed)``."""
    main = PaperAugment(crop_size, factor_range, colour_shift, colour_scale, colour_space) if train \
        else EvalTransform(crop_size)
    return _Chain(StainNormalize(), main) if stain_normalize else main


class SlideCache:
    """A small per-process LRU cache of open slides (data-loader workers each get their own)."""

    def __init__(self, backend: str = "auto", max_open: int = 8):
        self.backend = backend
        self.max_open = max_open
        self._slides: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str, mpp: float | None = None) -> Slide:
        if os.getpid() != self._pid:  # forked into a worker: handles are not shared across processes
            self._slides = OrderedDict()
            self._pid = os.getpid()
        key = str(path)
        if key in self._slides:
            self._slides.move_to_end(key)
            return self._slides[key]
        slide = open_slide(key, backend=self.backend, mpp=mpp)
        self._slides[key] = slide
        if len(self._slides) > self.max_open:
            _, old = self._slides.popitem(last=False)
            old.close()
        return slide

    def __getstate__(self):
        return {"backend": self.backend, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["backend"], state["max_open"])


class PatchDataset(Dataset):
    """Patches of the datalist items (``image``, ``location`` [y, x] at level 0, ``size`` [h, w], ``level``,
    ``label``), read through the project's slide reader (cuCIM by default).

    Items with a ``nolabel`` label are dropped unless ``include_nolabel``.

    Args:
        items: datalist items (see :func:`monai_wsi_ext.prep.prepare.datalist_items`).
        transform: callable on the HWC uint8 patch (see :func:`make_patch_transform`); None gives CHW float.
        backend: slide reader backend.
        include_nolabel: keep ``PatchLabel.NOLABEL`` (-1) items.

    Raises:
        ConfigError: the transform's ``crop_size`` is larger than the dataset's patches (e.g. a dataset prepared at
            64 px with the default 224 px crop), before any patch is read.
    """

    def __init__(self, items: Sequence[dict], transform=None, backend: str = "auto", include_nolabel: bool = False):
        self.items = [d for d in items
                      if include_nolabel or int(d.get("label", PatchLabel.NORMAL)) != PatchLabel.NOLABEL]
        self.transform = transform if transform is not None else EvalTransform(None)
        check_crop_fits(self.items, transform_crop_size(self.transform))
        self.cache = SlideCache(backend)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(d.get("label", PatchLabel.NOLABEL)) for d in self.items], np.int64)

    def __getitem__(self, index: int) -> dict:
        d = self.items[index]
        slide = self.cache.get(d["image"], d.get("mpp"))
        (y, x), (h, w) = d["location"], d["size"]
        patch = slide.read_region(x, y, w, h, int(d.get("level", 0)))
        return {PatchKeys.IMAGE.value: self.transform(patch),
                PatchKeys.LABEL.value: torch.tensor(int(d.get("label", PatchLabel.NOLABEL)), dtype=torch.long),
                PatchKeys.SLIDE_ID.value: str(d.get("slide_id", "")), PatchKeys.ROW.value: int(d.get("row", -1)),
                PatchKeys.COL.value: int(d.get("col", -1))}


def balanced_sampler(labels: Sequence[int], num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """Sample tumor and normal patches equally often (the paper's remedy for rare tumor patches).

    Args:
        labels: 0/1 label per dataset item.
        num_samples: draws per epoch (default: the dataset size).
        seed: generator seed.
    """
    labels = np.asarray(labels)
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    weights = np.array([1.0 / counts[c] for c in labels], np.float64)
    gen = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(torch.as_tensor(weights), num_samples or len(labels), replacement=True,
                                 generator=gen)


def load_datalist(path: str | os.PathLike, key: str | Sequence[str] = "training") -> list[dict]:
    """Items of one or several splits of a ``datalist.json`` written by ``prepare_dataset``.

    Raises:
        ConfigError: the file is missing or has no such split (naming the splits it has).
    """
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no datalist (`dataset_dir` must be a folder written by "
                          "scripts/prepare_dataset.py)")
    data = json.loads(Path(path).read_text())
    keys = [key] if isinstance(key, str) else list(key)
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: no split {missing}; it has {sorted(data)} (prepare the slides of that split into "
                          "the same folder: scripts/prepare_dataset.py --split ...)")
    return [item for k in keys for item in data[k]]


def label_budget(items: Sequence[dict], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """A class-stratified share of labelled patches (the label-budget experiments: what the encoder learns from 1 %
    or 10 % of the labels). Of each label, ``ceil(fraction * n)`` patches (at least one) are drawn with ``seed``
    without replacement; the items keep their order. ``fraction`` 1 returns the items unchanged.

    Raises:
        ConfigError: ``fraction`` outside (0, 1].
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"`label_fraction` must be in (0, 1], got {fraction}.")
    items = list(items)
    if fraction == 1.0:
        return items
    rng = np.random.default_rng(int(seed))
    labels = np.asarray([int(d["label"]) for d in items])
    keep: list[int] = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        keep += rng.choice(where, size=max(1, math.ceil(fraction * len(where))), replace=False).tolist()
    return [items[i] for i in sorted(keep)]


def transform_crop_size(transform) -> int | None:
    """The ``crop_size`` of a patch transform from :func:`make_patch_transform` (None when it does not crop)."""
    main = getattr(transform, "main", transform)
    return getattr(main, "crop_size", None)


def check_crop_fits(items: Sequence[dict], crop_size: int | None) -> None:
    """Fail before training when ``crop_size`` does not fit the datalist's patches.

    Raises:
        ConfigError: naming ``crop_size``, the patch sizes of the dataset and the fix.
    """
    if not crop_size or not items:
        return
    sides = {min(int(v) for v in d["size"]) for d in items if "size" in d}
    if sides and int(crop_size) > min(sides):
        side = min(sides)
        raise ConfigError(f"`crop_size` {crop_size} is larger than the dataset's patches ({sorted(sides)} px, as "
                          f"prepared in `dataset_dir`): give e.g. --crop_size {max(1, round(side * 224 / 256))} "
                          f"--patch_size {side} (the paper's 224/256 ratio), or prepare the slides with larger "
                          "patches")


def _shares_memory(t: torch.Tensor, arr: np.ndarray) -> bool:
    """Whether a tensor's storage overlaps a numpy array's buffer."""
    if t.device.type != "cpu" or t.numel() == 0 or arr.size == 0:
        return False
    t0 = t.untyped_storage().data_ptr()
    t1 = t0 + t.untyped_storage().nbytes()
    a0 = arr.__array_interface__["data"][0]
    a1 = a0 + arr.nbytes
    return t0 < a1 and a0 < t1


_MALLOC_TRIM = None


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Called before each separate patch read of :meth:`SlidePatchSource.read_raw`. Without it, repeated reads through
    cuCIM's batched reader let the pages freed since the previous read (the previous chunk's tensors and the encoder's
    activations) be pinned by the new read's small allocations, and glibc never returned them: resident memory grew
    by about 2.3 MB per 64-patch read, without bound (2.7 GB after 1200 reads; ``scripts/bench_e2e_memory.py``),
    so the end-to-end step's memory grew with the number of patches. Trimming first keeps it flat for about 1-10 ms
    per read.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


class SlidePatchSource:
    """All patches of one slide, read on demand (never kept), for feature extraction and end-to-end training.

    ``load(indices, seeds)`` reads the patches with the slide reader's batched path and applies the transform
    with ``set_random_state(seed)`` per patch, so the same ``(index, seed)`` always gives the same pixels.

    Args:
        image: slide path.
        x, y: level-0 top-left corner of each patch.
        level: read level.
        patch_size: patch side at ``level``.
        transform: see :func:`make_patch_transform`.
        backend: slide reader backend.
        mpp: level-0 mpp override.
        num_workers: decoder threads of the batched read.
    """

    def __init__(self, image: str, x: np.ndarray, y: np.ndarray, level: int, patch_size: int, transform=None,
                 backend: str = "auto", mpp: float | None = None, num_workers: int = 2):
        self.image = str(image)
        self.locations = np.stack([np.asarray(x, np.int64), np.asarray(y, np.int64)], axis=1)
        self.level = int(level)
        self.patch_size = int(patch_size)
        self.transform = transform if transform is not None else EvalTransform(None)
        self.backend = backend
        self.mpp = mpp
        self.num_workers = num_workers
        self._slide: Slide | None = None

    @classmethod
    def from_prepared(cls, prepared: PreparedSlide, transform=None, backend: str = "auto", num_workers: int = 2):
        """The patches of a prepared slide; a slide the preparation left open is read through, not reopened."""
        grid = prepared.grid
        source = cls(prepared.image, grid.x, grid.y, grid.level, grid.patch_size, transform, backend,
                     prepared.reader_mpp, num_workers)
        source._slide = prepared.slide
        return source

    def __len__(self) -> int:
        return len(self.locations)

    @property
    def slide(self) -> Slide:
        if self._slide is None:
            self._slide = open_slide(self.image, backend=self.backend, mpp=self.mpp)
        return self._slide

    def read_raw(self, indices) -> np.ndarray:
        """``(n, h, w, 3)`` uint8 patches in the order of ``indices``."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0, self.patch_size, self.patch_size, 3), np.uint8)
        _release_free_heap()
        batches = list(self.slide.read_regions(self.locations[idx], self.patch_size, self.level,
                                               num_workers=self.num_workers, batch_size=max(len(idx), 1)))
        return batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)

    def _apply(self, raw: np.ndarray, seeds) -> torch.Tensor:
        if hasattr(self.transform, "apply_batch"):
            return self.transform.apply_batch(raw, seeds)
        out = []
        for i, patch in enumerate(raw):
            if seeds is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(int(seeds[i]))
            out.append(self.transform(patch))
        return torch.stack(out) if out else torch.zeros(0)

    def load(self, indices, seeds=None) -> torch.Tensor:
        """Transformed ``(n, 3, h, w)`` patches; the augmentation of patch ``i`` is seeded with ``seeds[i]``."""
        idx = torch.as_tensor(indices).reshape(-1).cpu().numpy()
        sd = None if seeds is None else torch.as_tensor(seeds).reshape(-1).cpu().numpy()
        return self._apply(self.read_raw(idx), sd)

    __call__ = load

    def iter_batches(self, batch_size: int = 64, prefetch: int = 2) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(indices, patches)`` batches in table order, reading and transforming ahead in a background
        thread so that decoding overlaps the encoder (cuCIM and OpenSlide release the GIL while decoding).

        cuCIM reads the table in spans of a few batches (``Slide.read_regions``) and keeps decoding the next
        batches of a span while a batch is transformed; each batch is transformed straight from cuCIM's buffer
        (no uint8 copy) before the next one is requested. Stopping early finishes the current span first."""
        q: queue.Queue = queue.Queue(maxsize=max(int(prefetch), 1))
        stop = threading.Event()

        def reader():
            try:
                start = 0
                for raw in self.slide.read_regions(self.locations, self.patch_size, self.level,
                                                   num_workers=self.num_workers, batch_size=batch_size, copy=False):
                    if stop.is_set():
                        return
                    idx = np.arange(start, start + len(raw))
                    start += len(raw)
                    out = self._apply(raw, None)
                    if isinstance(out, torch.Tensor) and _shares_memory(out, raw):
                        out = out.clone()  # a transform that kept the pixels: copy them before cuCIM reuses them
                    q.put((idx, out))
                q.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None
        return state


class E2ESlideDataset(Dataset):
    """Slides for :class:`~monai_wsi_ext.engines.e2e.SurrogateE2ETrainer`: each item holds a patch source that
    re-reads the slide's patches on demand with replayable training augmentation, and the grid rows/cols/labels.

    Args:
        prepared_dir: output of ``prepare_dataset``.
        split: split(s) to use.
        crop_size: random crop of the augmentation.
        augment: the paper's augmentation (replayed from per-patch seeds) or the eval transform.
        stain_normalize: Macenko normalisation.
        backend: slide reader backend.
        num_workers: decoder threads of the batched patch reads.
        colour_shift, colour_scale, colour_space: the per-channel colour augmentation of :class:`PaperAugment`
            (with ``augment``), replayed from the same per-patch seeds as the rest of the augmentation, so the
            end-to-end step's two passes see identical pixels.
    """

    def __init__(self, prepared_dir: str, split: str | Sequence[str] | None = "training", crop_size: int | None = 224,
                 augment: bool = True, stain_normalize: bool = False, backend: str = "auto", num_workers: int = 2,
                 colour_shift: float = 0.0, colour_scale: float = 0.0, colour_space: str = "rgb"):
        self.slides = [m for m in load_prepared_slides(prepared_dir, split) if len(m.grid) > 0]
        if not self.slides:
            raise MonaiWsiExtError(f"{prepared_dir}: no prepared slides with patches for split {split!r}")
        self.crop_size, self.augment, self.stain_normalize = crop_size, augment, stain_normalize
        self.backend, self.num_workers = backend, num_workers
        self.colour = {"colour_shift": colour_shift, "colour_scale": colour_scale, "colour_space": colour_space}
        make_patch_transform(self.augment, self.crop_size, **self.colour)  # bad colour settings fail here

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        prepared = self.slides[index]
        transform = make_patch_transform(self.augment, self.crop_size, self.stain_normalize, **self.colour)
        return slide_item(prepared, SlidePatchSource.from_prepared(prepared, transform, self.backend, self.num_workers))


def slide_item(prepared: PreparedSlide, source: SlidePatchSource) -> dict:
    """The per-slide item of the slide-level engines (end-to-end training, validation, inference): the patch
    source and the grid rows/cols/labels as tensors, the slide id and the prepared slide."""
    grid = prepared.grid
    return {"patch_source": source, "rows": torch.from_numpy(grid.rows), "cols": torch.from_numpy(grid.cols),
            "labels": torch.from_numpy(grid.labels), "slide_id": prepared.slide_id, "prepared": prepared}
