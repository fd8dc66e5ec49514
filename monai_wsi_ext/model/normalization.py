"""Input and stain normalisation that travel with the encoder (issue 13 items 4 and 5).

Both are small modules at the front of :class:`~monai_wsi_ext.model.networks.PatchEncoder`, so whatever the
encoder was trained with is in its checkpoint (``state_dict``), in the exported models (the modules are part of the
graph) and therefore applied identically by feature extraction, inference, exported-model inference and the MONAI
Deploy application. The patch transforms keep giving RGB in [0, 1].

* :class:`InputNormalization`: ``(x - mean) / std`` per channel. Modes: ``unit`` (identity: the [0, 1] input,
  the default and what every earlier checkpoint was trained with), ``symmetric`` ([-1, 1]), ``imagenet`` (the
  ImageNet statistics torchvision's pretrained backbones expect) and ``standardize`` (mean/std measured on the
  training patches by :func:`fit_input_normalization`).
* :class:`ReinhardNormalization`: Reinhard et al.'s colour transfer in CIE L*a*b*: each patch's per-channel
  mean and standard deviation are mapped onto a target's, the target fitted once on a reference image by
  :func:`fit_reinhard_target`. It runs on the network input, i.e. after the training augmentation, which it
  partly undoes for colour (brightness and the per-channel colour shifts move the L*a*b* statistics it matches);
  Macenko (``stain_normalize: true``) stays a patch transform before the augmentation.
* :class:`VahadaneNormalization`: Vahadane et al.'s structure-preserving normalisation with the sparse stain
  separation of ``torch-staintools`` (the optional ``stain`` extra): each patch's H&E stain matrix is estimated by
  sparse dictionary learning on its tissue pixels, its stain concentrations are rescaled to the target's and
  recombined with the target's stain matrix (:func:`fit_vahadane_target`). Its iterations do not export to ONNX:
  the exported encoder graph starts after it, the model's metadata carries its target, and the runtimes run it in
  torch before the graph (:mod:`monai_wsi_ext.runtime`).

A module's statistics are saved only when they are not the identity, so checkpoints of the default encoder are
unchanged. When a checkpoint carries statistics, loading it sets them (and the mode) whatever the config said,
with a log line: the model's own normalisation wins, so inference cannot apply another one by mistake.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from monai_wsi_ext.errors import ConfigError

__all__ = [
    "INPUT_NORMS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputNormalization",
    "ReinhardNormalization",
    "VahadaneNormalization",
    "STAIN_NORMS",
    "META_STAIN_NORM",
    "rgb_to_lab",
    "lab_to_rgb",
    "fit_input_normalization",
    "fit_reinhard_target",
    "fit_vahadane_target",
    "stain_norm_from_metadata",
    "fit_encoder_normalization",
]

logger = logging.getLogger(__name__)

INPUT_NORMS = ("unit", "symmetric", "imagenet", "standardize")
STAIN_NORMS = ("reinhard", "vahadane")
#: ONNX metadata key of a stain normalisation that runs in torch before the exported encoder graph
META_STAIN_NORM = "wsi_canvas.stain_norm"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FIXED = {"unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
          "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
_EPS = 1e-6


class _SavedWhenActive(nn.Module):
    """Buffers saved in the ``state_dict`` only while ``active``; loading a state dict that holds them activates
    the module (the checkpoint's normalisation wins over the constructor's)."""

    _keys = ()

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def _describe(self) -> str:
        return type(self).__name__

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.active:
            for k in self._keys:
                t = getattr(self, k)
                destination[prefix + k] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        present = [k for k in self._keys if prefix + k in state_dict]
        if not present:
            if self.active and self._needs_fit():
                missing_keys.extend(prefix + k for k in self._keys)
            return
        if len(present) != len(self._keys):
            missing_keys.extend(prefix + k for k in self._keys if k not in present)
            return
        with torch.no_grad():
            for k in self._keys:
                value = state_dict[prefix + k]
                if value.shape != getattr(self, k).shape:
                    error_msgs.append(f"size mismatch for {prefix + k}: {tuple(value.shape)} in the checkpoint, "
                                      f"{tuple(getattr(self, k).shape)} expected")
                    return
                getattr(self, k).copy_(value)
        was = self._describe()
        self._loaded()
        if self._describe() != was:
            logger.info("%s: normalisation from the checkpoint: %s (the config asked for %s)", prefix.rstrip("."),
                        self._describe(), was)

    def _needs_fit(self) -> bool:
        return False

    def _loaded(self) -> None:
        self.active = True


class InputNormalization(_SavedWhenActive):
    """``(x - mean) / std`` per channel on ``(B, 3, H, W)`` inputs in [0, 1].

    Args:
        mode: one of :data:`INPUT_NORMS`. ``standardize`` starts at the identity until
            :func:`fit_input_normalization` (or a checkpoint) sets its statistics.
    """

    _keys = ("mean", "std")

    def __init__(self, mode: str = "unit") -> None:
        super().__init__()
        if mode not in INPUT_NORMS:
            raise ConfigError(f"`input_norm` must be one of {INPUT_NORMS}, got {mode!r}.")
        self.mode = mode
        mean, std = _FIXED.get(mode, _FIXED["unit"])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.active = mode != "unit"

    def _describe(self) -> str:
        if not self.active:
            return "unit"
        return f"{self.mode} (mean {[round(v, 4) for v in self.mean.flatten().tolist()]}, " \
               f"std {[round(v, 4) for v in self.std.flatten().tolist()]})"

    def _needs_fit(self) -> bool:
        return self.mode == "standardize"

    def _loaded(self) -> None:
        self.active = True
        for name, (mean, std) in _FIXED.items():
            if torch.allclose(self.mean.flatten(), torch.tensor(mean)) and \
                    torch.allclose(self.std.flatten(), torch.tensor(std)):
                self.mode = name
                self.active = name != "unit"
                return
        self.mode = "standardize"

    def set_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the per-channel statistics (``standardize``)."""
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        if not bool(torch.all(std_t > 0)):
            raise ConfigError(f"input normalisation: every channel std must be positive, got {list(std)}.")
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.std.copy_(std_t)
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# sRGB (D65) <-> CIE XYZ <-> CIE L*a*b*, on tensors in [0, 1]
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)
# the constants of CIE L*a*b*: (6/29)^3 and 3 (6/29)^2 are written out in the functions (TorchScript)


def _colour_constants(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rgb->xyz, xyz->rgb, white)`` matrices of :func:`rgb_to_lab` / :func:`lab_to_rgb`."""
    m = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)
    return m.to(dtype), torch.linalg.inv(m).to(dtype), torch.tensor(_WHITE, dtype=torch.float64).to(dtype)


def _rgb_to_lab(rgb: torch.Tensor, rgb_to_xyz: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0.0) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", rgb_to_xyz.to(rgb.dtype), linear) / white.to(rgb.dtype).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856451679035631, xyz.clamp(min=1e-12) ** (1.0 / 3.0),
                    xyz / 0.12841854934601665 + 4.0 / 29.0)
    return torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], 1)


def _lab_to_rgb(lab: torch.Tensor, xyz_to_rgb: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0], 1)
    xyz = torch.where(f > 0.20689655172413793, f ** 3, 0.12841854934601665 * (f - 4.0 / 29.0))
    xyz = xyz * white.to(lab.dtype).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", xyz_to_rgb.to(lab.dtype), xyz).clamp(0.0, 1.0)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=1e-12) ** (1.0 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` sRGB in [0, 1] -> CIE L*a*b* (D65; L in [0, 100])."""
    to_xyz, _, white = _colour_constants(rgb.dtype)
    return _rgb_to_lab(rgb, to_xyz, white)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    _, to_rgb, white = _colour_constants(lab.dtype)
    return _lab_to_rgb(lab, to_rgb, white)


class ReinhardNormalization(_SavedWhenActive):
    """Reinhard colour normalisation of ``(B, 3, H, W)`` RGB inputs in [0, 1]: each patch's L*a*b* channels are
    standardised over its pixels and mapped to the target's mean and standard deviation.

    Args:
        enabled: apply it (the target must then be fitted, :func:`fit_reinhard_target`, or come with a checkpoint).
    """

    _keys = ("target_mean", "target_std")

    def __init__(self, enabled: bool = False) -> None:
        super().__init__()
        self.register_buffer("target_mean", torch.tensor([70.0, 20.0, -10.0]).view(1, 3, 1, 1))
        self.register_buffer("target_std", torch.tensor([15.0, 10.0, 8.0]).view(1, 3, 1, 1))
        to_xyz, to_rgb, white = _colour_constants(torch.float32)
        self.register_buffer("rgb_to_xyz", to_xyz, persistent=False)
        self.register_buffer("xyz_to_rgb", to_rgb, persistent=False)
        self.register_buffer("white", white, persistent=False)
        self.active = bool(enabled)
        self.fitted = False

    def _describe(self) -> str:
        if not self.active:
            return "off"
        return f"reinhard (target L*a*b* mean {[round(v, 2) for v in self.target_mean.flatten().tolist()]}, " \
               f"std {[round(v, 2) for v in self.target_std.flatten().tolist()]})"

    def _needs_fit(self) -> bool:
        return True

    def _loaded(self) -> None:
        self.active = True
        self.fitted = True

    def set_target(self, mean: Sequence[float], std: Sequence[float]) -> None:
        with torch.no_grad():
            self.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.target_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1).clamp(min=_EPS))
        self.active = True
        self.fitted = True

    def fit_reference(self, reference: str | os.PathLike | np.ndarray) -> None:
        """Fit the target on a reference image or slide (:func:`fit_reinhard_target`)."""
        self.set_target(*fit_reinhard_target(reference))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        lab = _rgb_to_lab(x, self.rgb_to_xyz, self.white)
        mean = lab.mean(dim=[2, 3], keepdim=True)
        std = lab.std(dim=[2, 3], keepdim=True).clamp(min=1e-6)
        out = (lab - mean) / std * self.target_std.to(x.dtype) + self.target_mean.to(x.dtype)
        return _lab_to_rgb(out, self.xyz_to_rgb, self.white)


def _read_reference(path: str | os.PathLike) -> np.ndarray:
    """An RGB reference image (PNG/JPEG/TIFF...), or the tissue-level thumbnail of a slide."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"stain reference {str(p)!r} does not exist.")
    try:
        from PIL import Image

        with Image.open(p) as im:
            if getattr(im, "n_frames", 1) == 1 or p.suffix.lower() not in (".tif", ".tiff", ".svs"):
                return np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - not a plain image: try it as a slide
        pass
    from monai_wsi_ext.io.wsi import open_slide

    try:
        slide = open_slide(str(p))
        return np.asarray(slide.thumbnail(1024))[..., :3]
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"stain reference {p}: neither an image nor a readable slide ({e}).") from e


def fit_reinhard_target(reference: str | os.PathLike | np.ndarray, tissue_threshold: float = 0.85
                        ) -> tuple[list[float], list[float]]:
    """L*a*b* mean and std of a reference image's tissue pixels (pixels whose luminance is below
    ``tissue_threshold``; all pixels when fewer than 1 % are).

    Returns:
        ``(mean, std)``, three values each.
    """
    img = _read_reference(reference) if not isinstance(reference, np.ndarray) else np.asarray(reference)[..., :3]
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].to(torch.float64) / 255.0
    lab = rgb_to_lab(x)[0].reshape(3, -1)
    tissue = lab[0] < tissue_threshold * 100.0
    if int(tissue.sum()) < 0.01 * tissue.numel():
        tissue = torch.ones_like(tissue)
    pixels = lab[:, tissue]
    return pixels.mean(1).tolist(), pixels.std(1).clamp(min=_EPS).tolist()


# ------------------------------------------------------------------------------------------------------------------
# Vahadane (torch-staintools)
# ------------------------------------------------------------------------------------------------------------------
_STAIN_EXTRA = "pip install 'monai-wsi-canvas[stain]'` (from a checkout: `pip install -e '.[stain]'`)"


def _staintools():
    """The pieces of ``torch-staintools`` Vahadane needs, imported on first use.

    Raises:
        ConfigError: naming the ``stain`` extra when the package is not installed.
    """
    try:
        from torch_staintools.constants import CONFIG, PARAM
        from torch_staintools.functional.conversion.od import rgb2od
        from torch_staintools.functional.stain_extraction.utils import percentile
        from torch_staintools.functional.tissue_mask import get_tissue_mask
        from torch_staintools.functional.utility import img_from_concentration
        from torch_staintools.normalizer import NormalizerBuilder
    except ImportError as e:
        raise ConfigError(f"Vahadane stain normalisation needs the package torch-staintools ({e}); install it with "
                          f"`{_STAIN_EXTRA}.") from None
    # its dictionary learning is wrapped in torch.compile by default: 110 s of compilation on this CPU before the
    # first patch, and a recompilation for other shapes; eager gives the same numbers
    CONFIG.ENABLE_COMPILE = False
    return {"PARAM": PARAM, "rgb2od": rgb2od, "percentile": percentile, "get_tissue_mask": get_tissue_mask,
            "img_from_concentration": img_from_concentration, "NormalizerBuilder": NormalizerBuilder}


class VahadaneNormalization(_SavedWhenActive):
    """Vahadane stain normalisation of ``(B, 3, H, W)`` RGB inputs in [0, 1], one patch at a time.

    For each patch: its tissue pixels (luminosity below ``luminosity_threshold``) on every ``estimate_stride``-th row
    and column give its H&E stain matrix by ``torch-staintools``' sparse dictionary learning (FISTA, 60 steps; the
    random initial dictionary drawn from a generator seeded with ``seed`` for every patch, so a patch's result does
    not depend on the batch it is in); the concentrations of all its pixels (least squares) are scaled so that
    their 95th percentiles match the target's, and recombined with the target's stain matrix. A patch with fewer
    than ``min_tissue_pixels`` tissue pixels in the estimate passes unchanged. No gradient flows through it.

    Args:
        enabled: apply it (the target must be fitted, :func:`fit_vahadane_target`, or come with a checkpoint).
        estimate_stride: pixel step of the stain-matrix estimate (4: 3,136 of a 224 px patch's pixels).
        luminosity_threshold: tissue pixels have a CIE L* / 100 below this.
        seed: seed of each patch's initial dictionary.
        min_tissue_pixels: fewer tissue pixels in the estimate: the patch is returned as it is.
    """

    _keys = ("stain_matrix", "max_concentration")
    exportable = False  # dictionary learning per patch: the ONNX graph starts after it, see META_STAIN_NORM

    def __init__(self, enabled: bool = False, estimate_stride: int = 4, luminosity_threshold: float = 0.8,
                 seed: int = 0, min_tissue_pixels: int = 64) -> None:
        super().__init__()
        if int(estimate_stride) < 1:
            raise ConfigError(f"Vahadane `estimate_stride` must be >= 1, got {estimate_stride}.")
        if not 0.0 < float(luminosity_threshold) <= 1.0:
            raise ConfigError(f"Vahadane `luminosity_threshold` must be in (0, 1], got {luminosity_threshold}.")
        # H and E optical-density unit vectors (rows), and their concentrations' 95th percentiles in the target
        self.register_buffer("stain_matrix", torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]))
        self.register_buffer("max_concentration", torch.tensor([1.9, 1.0]))
        self.estimate_stride, self.luminosity_threshold = int(estimate_stride), float(luminosity_threshold)
        self.seed, self.min_tissue_pixels = int(seed), int(min_tissue_pixels)
        self.active = bool(enabled)
        self.fitted = False
        self._lib = None
        self._impl = None
        if self.active:
            self._library()  # fail at construction, not at the first batch, when the package is missing

    def _library(self):
        if self._impl is None:
            lib = _staintools()
            # plain attributes (not submodules): nothing of the library's object enters the state dict
            object.__setattr__(self, "_lib", lib)
            object.__setattr__(self, "_impl", lib["NormalizerBuilder"].build(
                "vahadane", luminosity_threshold=self.luminosity_threshold, concentration_solver="qr"))
        return self._lib, self._impl

    def _describe(self) -> str:
        if not self.active:
            return "off"
        return f"vahadane (target H {[round(v, 3) for v in self.stain_matrix[0].tolist()]}, " \
               f"E {[round(v, 3) for v in self.stain_matrix[1].tolist()]}, " \
               f"95th-percentile concentrations {[round(v, 3) for v in self.max_concentration.tolist()]})"

    def _needs_fit(self) -> bool:
        return True

    def _loaded(self) -> None:
        self.active = True
        self.fitted = True
        self._library()

    def settings(self) -> dict:
        """Everything needed to rebuild this step (the ONNX metadata entry :data:`META_STAIN_NORM`)."""
        return {"method": "vahadane", "stain_matrix": self.stain_matrix.tolist(),
                "max_concentration": self.max_concentration.tolist(), "estimate_stride": self.estimate_stride,
                "luminosity_threshold": self.luminosity_threshold, "seed": self.seed,
                "min_tissue_pixels": self.min_tissue_pixels}

    def set_target(self, stain_matrix: Sequence[Sequence[float]], max_concentration: Sequence[float]) -> None:
        m = torch.as_tensor(stain_matrix, dtype=torch.float32)
        c = torch.as_tensor(max_concentration, dtype=torch.float32)
        if m.shape != (2, 3) or c.shape != (2,) or not bool(torch.isfinite(m).all() and torch.isfinite(c).all()):
            raise ConfigError(f"Vahadane target: need a finite 2 x 3 stain matrix and 2 concentrations, got shapes "
                              f"{tuple(m.shape)} and {tuple(c.shape)}.")
        if not bool((c > 0).all()):
            raise ConfigError(f"Vahadane target: the concentrations must be positive, got {c.tolist()}.")
        with torch.no_grad():
            self.stain_matrix.copy_(m)
            self.max_concentration.copy_(c)
        self.active = True
        self.fitted = True
        self._library()

    def fit_reference(self, reference: str | os.PathLike | np.ndarray) -> None:
        """Fit the target on a reference image or slide (:func:`fit_vahadane_target`)."""
        self.set_target(*fit_vahadane_target(reference, luminosity_threshold=self.luminosity_threshold,
                                             seed=self.seed))

    def _stain_matrix_of(self, image: torch.Tensor, stride: int) -> torch.Tensor | None:
        """``(1, 2, 3)`` stain matrix of one ``(1, 3, H, W)`` image, or None with too little tissue."""
        lib, impl = self._library()
        small = image[..., ::stride, ::stride].float()
        mask = lib["get_tissue_mask"](small, self.luminosity_threshold, None, throw_error=False).contiguous()
        if int(mask.sum()) < self.min_tissue_pixels:
            return None
        impl.get_stain_matrix.rng = torch.Generator(device=image.device).manual_seed(self.seed)
        return impl.get_stain_matrix(lib["rgb2od"](small), mask)

    def _concentrations(self, image: torch.Tensor, stain_matrix: torch.Tensor) -> torch.Tensor:
        lib, impl = self._library()
        return impl.concentration_solver(lib["rgb2od"](image.float()), stain_matrix, rng=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        lib, _ = self._library()
        q = lib["PARAM"].MAX_CONCENTRATION_PERC
        target = self.stain_matrix.to(x.device, torch.float32)[None]
        max_target = self.max_concentration.to(x.device, torch.float32)[None, None]
        out = []
        # thousands of tiny operations: on a CPU, one thread is faster than several (by hand on 4 patches: 0.55
        # against 0.73 s per patch on 2 threads, OMP_WAIT_POLICY=PASSIVE); the setting is restored afterwards
        threads = torch.get_num_threads()
        if x.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            with torch.no_grad():
                for i in range(x.shape[0]):
                    xi = x[i:i + 1]
                    sm = self._stain_matrix_of(xi, self.estimate_stride)
                    if sm is None:
                        out.append(xi.float())
                        continue
                    conc = self._concentrations(xi, sm)
                    conc = conc * (max_target / (lib["percentile"](conc, q=q, dim=-2)[:, None] + 1e-14))
                    out.append(lib["img_from_concentration"](conc, target, tuple(xi.shape), (0.0, 1.0)))
        finally:
            torch.set_num_threads(threads)
        return torch.cat(out).to(x.dtype) if out else x


def fit_vahadane_target(reference: str | os.PathLike | np.ndarray, luminosity_threshold: float = 0.8,
                        seed: int = 0, max_estimate_pixels: int = 65536
                        ) -> tuple[list[list[float]], list[float]]:
    """Vahadane target of a reference image (or slide thumbnail): its stain matrix, estimated on a pixel grid of at
    most ``max_estimate_pixels`` pixels, and the 95th percentiles of its concentrations over all pixels.

    Returns:
        ``(stain_matrix, max_concentration)``: 2 x 3 (H, E rows) and 2 values.

    Raises:
        ConfigError: unreadable reference, too little tissue, or the ``stain`` extra missing.
    """
    img = _read_reference(reference) if not isinstance(reference, np.ndarray) else np.asarray(reference)[..., :3]
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
    norm = VahadaneNormalization(luminosity_threshold=luminosity_threshold, seed=seed)
    stride = max(1, int(np.ceil(np.sqrt(x.shape[2] * x.shape[3] / max_estimate_pixels))))
    with torch.no_grad():
        sm = norm._stain_matrix_of(x, stride)
        if sm is None:
            where = reference if not isinstance(reference, np.ndarray) else "the reference image"
            raise ConfigError(f"Vahadane target: {where} has too little tissue (luminosity < {luminosity_threshold}) "
                              "to estimate its stain matrix.")
        conc = norm._concentrations(x, sm)
        lib, _ = norm._library()
        maxc = lib["percentile"](conc, q=lib["PARAM"].MAX_CONCENTRATION_PERC, dim=-2)
    return sm[0].tolist(), maxc[0].tolist()


def stain_norm_from_metadata(metadata: dict) -> nn.Module | None:
    """The torch pre-step an exported encoder's :data:`META_STAIN_NORM` entry describes, or None."""
    import json

    text = metadata.get(META_STAIN_NORM)
    if not text:
        return None
    try:
        spec = json.loads(text)
        if spec.get("method") != "vahadane":
            raise ConfigError(f"unknown stain normalisation {spec.get('method')!r} in the model's metadata.")
        norm = VahadaneNormalization(True, spec["estimate_stride"], spec["luminosity_threshold"], spec["seed"],
                                     spec["min_tissue_pixels"])
        norm.set_target(spec["stain_matrix"], spec["max_concentration"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the model's stain normalisation metadata is unreadable ({e}).") from None
    return norm.eval()


def fit_input_normalization(patches: torch.Tensor | np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``(N, 3, H, W)`` patches in [0, 1] (after any stain normalisation)."""
    x = torch.as_tensor(patches, dtype=torch.float64)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ConfigError(f"input normalisation: need (N, 3, H, W) patches, got shape {tuple(x.shape)}.")
    flat = x.transpose(0, 1).reshape(3, -1)
    return flat.mean(1).tolist(), flat.std(1).clamp(min=_EPS).tolist()


def _stain_name(module: nn.Module) -> str:
    return "vahadane" if isinstance(module, VahadaneNormalization) else "reinhard"


def fit_encoder_normalization(encoder: nn.Module, datalist: Sequence[dict] | None = None,
                              stain_reference: str | os.PathLike | None = None, crop_size: int | None = 224,
                              max_patches: int = 1024, backend: str = "auto", seed: int = 0) -> nn.Module:
    """Fit what the encoder's normalisation needs before training (``train_encoder.json#initialize``):

    * the Reinhard or Vahadane target on ``stain_reference`` when the encoder's stain normalisation is on and not
      yet fitted
      (a checkpoint that carried one counts as fitted);
    * the ``standardize`` statistics on up to ``max_patches`` training patches (drawn with ``seed`` from
      ``datalist``, read with the eval transform, passed through the stain step when it is on).

    Nothing is read when neither applies. Returns the encoder.

    Raises:
        ConfigError: Reinhard or Vahadane without a reference, ``standardize`` without a datalist.
    """
    net = getattr(encoder, "module", encoder)  # DistributedDataParallel / DataParallel wrap the encoder
    stain = getattr(net, "stain_norm", None)
    norm = getattr(net, "input_norm", None)
    stain_on = isinstance(stain, (ReinhardNormalization, VahadaneNormalization)) and stain.active
    if stain_on and not stain.fitted:
        if stain_reference is None:
            raise ConfigError(f"`input_stain_norm: {_stain_name(stain)}` needs `stain_reference`: an image (or "
                              "slide) of the staining to normalise to.")
        stain.fit_reference(stain_reference)
        logger.info("%s target fitted on %s: %s", _stain_name(stain).capitalize(), stain_reference,
                    stain._describe())
    if isinstance(norm, InputNormalization) and norm.mode == "standardize":
        if not datalist:
            raise ConfigError("`input_norm: standardize` needs the training datalist to measure the statistics on.")
        from monai_wsi_ext.data.patches import PatchDataset, make_patch_transform

        rng = np.random.default_rng(seed)
        items = list(datalist)
        pick = sorted(rng.choice(len(items), size=min(int(max_patches), len(items)), replace=False).tolist())
        ds = PatchDataset([items[i] for i in pick], transform=make_patch_transform(False, crop_size),
                          backend=backend)
        batch = torch.stack([ds[i]["image"] for i in range(len(ds))])
        device = next((b.device for b in norm.buffers()), torch.device("cpu"))
        if stain_on:
            with torch.no_grad():
                batch = torch.cat([stain(batch[i:i + 64].to(device)).cpu() for i in range(0, len(batch), 64)])
        mean, std = fit_input_normalization(batch)
        norm.set_statistics(mean, std)
        logger.info("input normalisation fitted on %d training patches: %s", len(ds), norm._describe())
    return encoder
