"""Patch encoders (GoogLeNet / DenseNet121 with a short feature layer) and the canvas U-Net.

The encoder is ``backbone -> 1024-d pooled vector -> [dropout] -> Linear(1024, feature_dim) -> [act] ->
Linear(feature_dim, num_classes)``. ``features(x)`` stops at the feature layer: that vector is what the feature
canvas holds, and in end-to-end training the final layer (``head``) is not used (paper, section 3.2.2).

Feature activation: the paper only says an FC layer is added before the final layer. The default here is a plain
linear feature layer (``feature_activation=None``): the canvas fills empty cells with 0, and a ReLU would map many
tissue features to exactly 0 as well, making tissue and background indistinguishable in those channels.
``feature_activation="relu"`` is available for experiments.

The canvas U-Net is a MONAI ``UNet`` defined once, by the bundle: ``bundle/configs/common.json#unet_def``.
:func:`bundle_unet` builds it from the config files for code outside a bundle run (the benchmarks);
:func:`make_unet` builds a UNet of explicitly given channels (tests, other architectures).

Pretrained weights are only ever read from a local file with ``torch.load(..., weights_only=True)``; nothing is
downloaded.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_wsi_ext.labels import IGNORE_INDEX
from monai_wsi_ext.errors import ConfigError

__all__ = [
    "BACKBONES",
    "PatchEncoder",
    "LoadReport",
    "read_state_dict",
    "load_pretrained",
    "load_checkpoint",
    "load_encoder_checkpoint",
    "UNET_ID",
    "bundle_unet",
    "make_unet",
    "NOLABEL_TARGET_BASE",
    "nolabel_target",
    "CanvasCrossEntropyLoss",
    "canvas_loss",
]

logger = logging.getLogger(__name__)

BACKBONES = ("googlenet", "densenet121")
_WRAPPER_KEYS = ("state_dict", "model", "encoder", "network", "net", "model_state_dict")
_DENSE_LAYER = re.compile(
    r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)


class _DenseNetBackbone(nn.Module):
    """MONAI DenseNet121 without its final linear layer: ``features`` + ReLU + global average pooling (1024-d)."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121

        net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=1)
        self.features = net.features
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = int(net.class_layers.out.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.relu(self.features(x))), 1)


@functools.lru_cache(maxsize=1)
def _googlenet_class() -> type[nn.Module]:
    """torchvision ``GoogLeNet`` whose ``forward`` returns a tensor (scriptable; the state dict keys are unchanged).

    Scripted torchvision GoogLeNet always returns a ``GoogLeNetOutputs`` tuple, which does not type-check inside
    :meth:`PatchEncoder.features`; this subclass returns the main branch only (there are no auxiliary heads here).
    """
    from torchvision.models import GoogLeNet

    class GoogLeNetBackbone(GoogLeNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x, _, _ = self._forward(self._transform_input(x))
            return x

    return GoogLeNetBackbone


def _googlenet_backbone(dropout: float) -> nn.Module:
    # same construction as ``torchvision.models.googlenet(weights=None, aux_logits=False, ...)``
    net = _googlenet_class()(aux_logits=False, transform_input=False, init_weights=True, dropout=float(dropout))
    net.fc = nn.Identity()
    net.out_features = 1024
    return net


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        target: ``"backbone"`` or ``"encoder"`` (the whole :class:`PatchEncoder`) or the module class name.
        loaded: keys copied into the module.
        missing: module keys the file did not provide.
        unexpected: file keys the module does not have.
        skipped: file keys whose tensor shape differs from the module's (not loaded).
    """

    target: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_state_dict(
    path: str | os.PathLike, option: str = "pretrained_path", key: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a local checkpoint file, safely.

    Accepts a raw state dict, or a dict that wraps one under ``"state_dict"``, ``"model"``, ``"encoder"``,
    ``"network"``, ``"net"`` or ``"model_state_dict"`` (nested wrappers are unwrapped); a ``"module."`` prefix
    (DataParallel/DDP) is stripped. Only tensors are kept.

    Args:
        path: checkpoint file (``.pt``/``.pth``).
        option: the name of the setting that gave ``path`` (``pretrained_path``, ``encoder_ckpt``...), named in
            the error when the file is missing.
        key: take the state dict from this entry of the file (e.g. ``"model"`` of a nested checkpoint).

    Returns:
        Mapping of parameter/buffer names to tensors (on CPU).

    Raises:
        ConfigError: when the file is missing, is not a plain tensor checkpoint (``weights_only=True`` refuses
            arbitrary pickled objects), or holds no tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"`{option}` {path!r} does not exist; give a local .pt/.pth file (nothing is downloaded).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Save plain state dicts (`torch.save(model.state_dict(), path)`); pickled objects are refused."
        ) from e
    if key:
        if not isinstance(obj, Mapping) or key not in obj:
            top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise ConfigError(f"`{option}` {path}: has no entry {key!r} (top-level keys: {top}).")
        obj = obj[key]
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}.")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConfigError(f"{path}: holds no tensors (keys: {list(obj)[:8]}); is this a model checkpoint?")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _remap_densenet(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision DenseNet names (``denselayer1.norm1`` / legacy ``norm.1``) -> MONAI names (``layers.norm1``)."""
    out = {}
    for k, v in sd.items():
        m = _DENSE_LAYER.match(k)
        out[f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}" if m else k] = v
    return out


def load_pretrained(module: nn.Module, state_dict: Mapping[str, torch.Tensor], target: str = "") -> LoadReport:
    """Copy matching tensors into ``module`` (``strict=False``), logging what did not match.

    Args:
        module: destination module.
        state_dict: source tensors.
        target: name used in the log lines and the report.

    Returns:
        A :class:`LoadReport`.

    Raises:
        ConfigError: when not a single tensor matched (wrong file or wrong backbone).
    """
    target = target or type(module).__name__
    own = module.state_dict()
    report = LoadReport(target=target)
    usable = {}
    for k, v in state_dict.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.skipped.append(k)
            logger.warning(
                "%s: skipping %s, shape %s in the file vs %s in the model",
                target,
                k,
                tuple(v.shape),
                tuple(own[k].shape),
            )
        else:
            usable[k] = v
    if not usable:
        raise ConfigError(
            f"none of the {len(state_dict)} tensors in the checkpoint match {target} "
            f"(file keys e.g. {list(state_dict)[:3]}, model keys e.g. {list(own)[:3]}); check the backbone choice."
        )
    result = module.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = list(result.missing_keys)
    if report.missing:
        logger.warning("%s: %d missing keys not in the checkpoint: %s", target, len(report.missing), report.missing)
    if report.unexpected:
        logger.warning(
            "%s: %d unexpected keys in the checkpoint ignored: %s", target, len(report.unexpected), report.unexpected
        )
    logger.info("%s: loaded %d of %d tensors", target, len(report.loaded), len(own))
    return report


class PatchEncoder(nn.Module):
    """Patch classifier whose penultimate layer is a short feature vector for the canvas.

    Args:
        backbone: ``"googlenet"`` (torchvision, randomly initialised) or ``"densenet121"`` (MONAI), the paper's,
            both a 1024-d pooled vector; or any name of :func:`monai_wsi_ext.model.backbones.build_backbone` (a
            torchvision classification model such as ``resnet18``/``efficientnet_b0``, ``monai:<name>``,
            ``small_cnn``), whose pooled width the feature layer takes.
        feature_dim: length of the feature vector (16 in the paper).
        num_classes: classes of the patch head (2: normal, tumor).
        pretrained_path: optional local checkpoint: a raw backbone state dict (torchvision/ImageNet or MONAI key
            names), a full ``PatchEncoder`` state dict, or either wrapped under ``"state_dict"``/``"model"``/
            ``"encoder"``/``"network"``. Loaded with ``strict=False``; mismatches are logged.
        dropout: dropout on the 1024-d pooled vector in training mode.
        feature_activation: None (default, linear feature layer) or ``"relu"`` between features and head.
        input_norm: the input normalisation in front of the backbone
            (:class:`~monai_wsi_ext.model.normalization.InputNormalization`: ``unit`` = the [0, 1] patches as they
            are, ``symmetric``, ``imagenet``, ``standardize``); saved with the weights when not ``unit``.
        input_stain_norm: None, ``"reinhard"`` (Reinhard colour normalisation,
            :class:`~monai_wsi_ext.model.normalization.ReinhardNormalization`) or ``"vahadane"`` (Vahadane stain
            normalisation, :class:`~monai_wsi_ext.model.normalization.VahadaneNormalization`, the ``stain``
            extra) of each patch before the input normalisation; its target is fitted on a reference image and
            saved with the weights.

    Note:
        GoogLeNet is built with ``transform_input=False``; torchvision's ImageNet GoogLeNet weights expect
        ImageNet-normalised inputs, which is the data pipeline's job.
    """

    def __init__(
        self,
        backbone: str = "googlenet",
        feature_dim: int = 16,
        num_classes: int = 2,
        pretrained_path: str | os.PathLike | None = None,
        dropout: float = 0.0,
        feature_activation: str | None = None,
        input_norm: str = "unit",
        input_stain_norm: str | None = None,
    ) -> None:
        super().__init__()
        from monai_wsi_ext.model.normalization import (STAIN_NORMS, InputNormalization, ReinhardNormalization,
                                                       VahadaneNormalization)

        if input_stain_norm not in (None, *STAIN_NORMS):
            raise ConfigError(f"`input_stain_norm` must be None or one of {list(STAIN_NORMS)}, "
                              f"got {input_stain_norm!r}.")
        if not isinstance(backbone, str) or not backbone:
            raise ConfigError(f"`backbone` must be a name ({BACKBONES} or one of monai_wsi_ext.model.backbones), "
                              f"got {backbone!r}.")
        if int(feature_dim) < 1 or int(num_classes) < 1:
            raise ConfigError(f"`feature_dim` and `num_classes` must be positive, got {feature_dim}, {num_classes}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"`dropout` must be in [0, 1), got {dropout}.")
        if feature_activation not in (None, "relu"):
            raise ConfigError(f"`feature_activation` must be None or 'relu', got {feature_activation!r}.")
        self.backbone_name = backbone
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        if backbone == "googlenet":
            self.backbone = _googlenet_backbone(dropout)
            self.dropout = nn.Identity()  # GoogLeNet applies its own dropout before the (removed) fc
        elif backbone == "densenet121":
            self.backbone = _DenseNetBackbone()
            self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        else:  # torchvision models by name, monai:<name>, small_cnn (ConfigError for an unknown name)
            from monai_wsi_ext.model.backbones import build_backbone

            self.backbone = build_backbone(backbone)
            self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.feature = nn.Linear(self.backbone.out_features, self.feature_dim)
        self.act = nn.ReLU() if feature_activation == "relu" else nn.Identity()
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        self.stain_norm = VahadaneNormalization(True) if input_stain_norm == "vahadane" \
            else ReinhardNormalization(input_stain_norm == "reinhard")
        self.input_norm = InputNormalization(input_norm)
        self._register_load_state_dict_pre_hook(self._stain_method_of_checkpoint)
        if pretrained_path is not None:
            self.load_weights(pretrained_path)

    def _stain_method_of_checkpoint(self, state_dict, prefix, *args) -> None:
        """Before loading: a checkpoint whose stain normalisation is the other method replaces the module (the
        checkpoint's normalisation wins, as for the input normalisation; its buffers then load into it)."""
        from monai_wsi_ext.model.normalization import ReinhardNormalization, VahadaneNormalization

        for cls in (VahadaneNormalization, ReinhardNormalization):
            if all(f"{prefix}stain_norm.{k}" in state_dict for k in cls._keys) and not isinstance(self.stain_norm,
                                                                                                    cls):
                logger.info("%sstain_norm: the checkpoint's is %s", prefix, cls.__name__)
                device = next(self.stain_norm.buffers()).device
                self.stain_norm = cls(False).to(device)

    @torch.jit.unused
    def optional_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint may hold although this encoder's configuration does not save them: the
        statistics of the input normalisation and the target of either stain method. Loading them sets the
        checkpoint's normalisation (see :mod:`~monai_wsi_ext.model.normalization`)."""
        from monai_wsi_ext.model.normalization import (InputNormalization, ReinhardNormalization,
                                                       VahadaneNormalization)

        keys = {f"input_norm.{k}" for k in InputNormalization._keys}
        for cls in (ReinhardNormalization, VahadaneNormalization):
            keys |= {f"stain_norm.{k}" for k in cls._keys}
        return keys

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) patches -> (B, feature_dim) canvas features (also exported in TorchScript)."""
        return self.features_after_stain(self.stain_norm(x))

    def features_after_stain(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` of patches already stain-normalised (the exported graph when the stain step does not
        export, see :data:`~monai_wsi_ext.model.normalization.META_STAIN_NORM`)."""
        return self.feature(self.dropout(self.backbone(self.input_norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) patches -> (B, num_classes) logits."""
        return self.head(self.act(self.features(x)))

    def load_weights(self, path: str | os.PathLike) -> LoadReport:
        """Load a local checkpoint into the whole encoder (when its keys are encoder keys) or into the backbone.

        Args:
            path: see ``pretrained_path`` of the constructor.

        Returns:
            A :class:`LoadReport`.
        """
        sd = read_state_dict(path)
        if any(k.split(".", 1)[0] in ("backbone", "feature", "head") for k in sd):
            if self.backbone_name == "densenet121":
                sd = _remap_densenet(sd)
            return load_pretrained(self, sd, target="encoder")
        if self.backbone_name == "densenet121":
            sd = _remap_densenet(sd)
        return load_pretrained(self.backbone, sd, target=f"{self.backbone_name} backbone")


def _guess_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    """A short guess of what network a state dict belongs to, from its key names (empty when unsure)."""
    keys = list(sd)
    encoder = any(k.startswith(("backbone.", "feature.", "head.")) for k in keys)
    body = [k[len("backbone.") :] if k.startswith("backbone.") else k for k in keys]
    if any("denseblock" in k or "denselayer" in k for k in body):
        backbone = "densenet121"
    elif any(k.startswith(("inception3a.", "conv1.conv.")) for k in body):
        backbone = "googlenet"
    else:
        backbone = ""
    if encoder and backbone:
        extra = []
        if "feature.weight" in sd and sd["feature.weight"].ndim == 2:
            extra.append(f"feature_dim {int(sd['feature.weight'].shape[0])}")
        if "head.weight" in sd and sd["head.weight"].ndim == 2:
            extra.append(f"num_classes {int(sd['head.weight'].shape[0])}")
        return f"a {backbone} PatchEncoder" + (f" ({', '.join(extra)})" if extra else "")
    if backbone:
        return f"a bare {backbone} backbone (such weights belong in `pretrained_path`)"
    if any(k.startswith("model.0.") for k in keys):
        return "a MONAI UNet"
    return ""


def _describe_network(network: nn.Module) -> str:
    name = type(network).__name__
    if isinstance(network, PatchEncoder):
        return (f"a {network.backbone_name} {name} (backbone {network.backbone_name!r}, feature_dim "
                f"{network.feature_dim}, num_classes {network.num_classes})")
    attrs = [f"{a} {getattr(network, a)}" for a in ("in_channels", "out_channels", "channels", "strides",
                                                     "num_res_units") if hasattr(network, a)]
    return f"a {name}" + (f" ({', '.join(attrs)})" if attrs else "")


def load_checkpoint(
    network: nn.Module,
    path: str | os.PathLike,
    option: str = "encoder_ckpt",
    drop_head: bool = False,
    key: str | None = None,
) -> LoadReport:
    """Load a checkpoint that must fit ``network`` exactly: every tensor of the network, by name and shape.

    This is the one way trained weights are loaded (inference, feature extraction, baselines, export and the
    start of end-to-end training). Partial loading is only for backbone weights (``pretrained_path``, see
    :meth:`PatchEncoder.load_weights`).

    Args:
        network: destination network (a :class:`PatchEncoder`, a U-Net, ...).
        path: checkpoint file (raw or wrapped state dict, e.g. a CheckpointSaver file; see :func:`read_state_dict`).
        option: the setting that gave ``path``, named in the errors (``encoder_ckpt``, ``unet_ckpt``...).
        drop_head: do not load (and do not require) the final layer ``head.*``; end-to-end training does not use it.
        key: take the state dict from this entry of the file.

    Returns:
        A :class:`LoadReport` whose ``loaded`` lists every tensor copied (``missing``/``unexpected``/``skipped``
        are empty).

    Raises:
        ConfigError: when the file is missing or unreadable, or when any network tensor is missing from it, has
            another shape, or the file holds tensors the network does not have. The message names ``option``, the
            file, the expected network (for an encoder its backbone) and what the checkpoint looks like.
    """
    sd = read_state_dict(path, option=option, key=key)
    n_file = len(sd)
    guess = _guess_architecture(sd)
    if drop_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if getattr(network, "backbone_name", None) == "densenet121":
        sd = _remap_densenet(sd)
    own = network.state_dict()
    required = [k for k in own if not (drop_head and k.startswith("head."))]
    missing = [k for k in required if k not in sd]
    # the normalisation a checkpoint carries is taken whatever the config said (PatchEncoder.optional_state_keys)
    optional = network.optional_state_keys() if hasattr(network, "optional_state_keys") else set()
    unexpected = [k for k in sd if k not in own and k not in optional]
    mismatched = [k for k in required if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(required) - len(missing) - len(mismatched)} of the network's {len(required)} tensors match"]
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with another shape (e.g. {k!r}: {tuple(sd[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the network)")
        raise ConfigError(
            f"`{option}` {os.fspath(path)!r} does not fit the network: expected {_describe_network(network)}; "
            f"the checkpoint holds {n_file} tensors (e.g. {list(sd)[:3]})"
            + (f" and looks like {guess}" if guess else "")
            + f"; {', '.join(parts)}. Give the checkpoint trained with these settings, or change the settings "
            "(e.g. `backbone`, `feature_dim`, the U-Net channels) to those of the checkpoint."
        )
    network.load_state_dict(sd, strict=not drop_head)
    logger.info("%s: loaded all %d tensors from %s", option, len(sd), os.fspath(path))
    return LoadReport(target=option, loaded=sorted(sd))


def load_encoder_checkpoint(encoder: PatchEncoder, path: str | os.PathLike, drop_head: bool = False) -> LoadReport:
    """``load_checkpoint(encoder, path, option="encoder_ckpt", drop_head=drop_head)`` (kept for callers)."""
    return load_checkpoint(encoder, path, option="encoder_ckpt", drop_head=drop_head)


UNET_ID = "unet_def"
"""Id of the canvas U-Net in the bundle configs (``bundle/configs/common.json#unet_def``), the one definition of
its hyperparameters."""


def bundle_unet(config_files: str | os.PathLike | Sequence[str | os.PathLike], **overrides) -> nn.Module:
    """The canvas U-Net exactly as the bundle builds it: ``unet_def`` of the merged ``config_files``.

    ``bundle/configs/common.json#unet_def`` holds the U-Net's hyperparameters once; the training, inference and
    export configs reference it, and scripts that build the U-Net outside a bundle run (the benchmarks) call this,
    so that every U-Net of the project has the same architecture.

    Args:
        config_files: bundle config files, merged in order (at least ``common.json``; an overlay may follow).
        overrides: parser overrides applied before parsing, as on the ``monai.bundle`` command line:
            ``feature_dim=32`` or ``**{"unet_def#num_res_units": 1}``.

    Returns:
        The (newly instantiated) ``monai.networks.nets.UNet``.

    Raises:
        ConfigError: the configs define no ``unet_def``.
    """
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    parser = ConfigParser()
    parser.read_config([os.fspath(f) for f in files])
    parser.update(overrides)
    if UNET_ID not in parser:
        raise ConfigError(f"no `{UNET_ID}` in the bundle configs {[os.fspath(f) for f in files]}")
    return parser.get_parsed_content(UNET_ID, instantiate=True)


def make_unet(
    feature_dim: int = 16,
    num_classes: int = 2,
    *,
    channels: Sequence[int],
    strides: Sequence[int] | None = None,
    num_res_units: int = 0,
    dropout: float = 0.0,
    **kwargs,
) -> nn.Module:
    """A 2-d MONAI UNet from ``feature_dim`` channels to ``num_classes`` logits, for tests and experiments with other
    architectures.

    The project's canvas U-Net is ``common.json#unet_def`` (build it with :func:`bundle_unet`); this function has no
    U-Net hyperparameters of its own: ``channels`` must be given and the other defaults are MONAI ``UNet``'s.

    Args:
        feature_dim: channels of the feature canvas.
        num_classes: output classes (2: normal, tumor).
        channels: channels per level.
        strides: downsampling per level (``len(channels) - 1`` entries; default 2 at every level); canvas sizes
            must be divisible by their product.
        num_res_units: residual units per block.
        dropout: dropout rate inside the UNet.
        kwargs: further ``monai.networks.nets.UNet`` arguments (``norm``, ``act``...).

    Returns:
        ``monai.networks.nets.UNet`` with ``spatial_dims=2``.
    """
    from monai.networks.nets import UNet

    if strides is None:
        strides = (2,) * max(len(channels) - 1, 0)
    if len(strides) != len(channels) - 1:
        raise ConfigError(f"`strides` needs len(channels) - 1 = {len(channels) - 1} entries, got {list(strides)}.")
    return UNet(
        spatial_dims=2,
        in_channels=int(feature_dim),
        out_channels=int(num_classes),
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=int(num_res_units),
        dropout=float(dropout),
        **kwargs,
    )


NOLABEL_TARGET_BASE = -3
"""Training label canvases built with ``canvas_nolabel_weight`` (see
:class:`~monai_wsi_ext.data.features.CanvasDataset`) hold ``NOLABEL_TARGET_BASE - c`` for a nolabel tissue cell
taken as class ``c`` (-3: taken as normal, -4: taken as tumor; :func:`nolabel_target`). The codes are negative, as
every "not a labelled patch" code of :mod:`monai_wsi_ext.labels`, so they never count as labelled; only
:class:`CanvasCrossEntropyLoss` with a ``nolabel_weight`` reads them."""


def nolabel_target(cls: torch.Tensor) -> torch.Tensor:
    """The canvas target of nolabel cells taken as class ``cls`` (0 normal, 1 tumor): ``NOLABEL_TARGET_BASE - cls``."""
    return NOLABEL_TARGET_BASE - cls


class CanvasCrossEntropyLoss(nn.CrossEntropyLoss):
    """Softmax cross-entropy over canvas cells that ignores background and nolabel cells (:data:`IGNORE_INDEX`),
    with optional class weights and an optional loss weight for nolabel tissue cells.

    With ``nolabel_weight=None`` (the default) this is exactly ``torch.nn.CrossEntropyLoss(weight=weight,
    ignore_index=IGNORE_INDEX)``. With a ``nolabel_weight``, targets ``NOLABEL_TARGET_BASE - c`` (nolabel tissue
    cells taken as class ``c``, see :data:`NOLABEL_TARGET_BASE`) count as class ``c`` with the loss weight
    ``nolabel_weight`` (times the class weight); the ``mean`` reduction is then the weighted mean
    ``sum_i w_i CE_i / sum_i w_i``, as PyTorch's for class weights.

    Args:
        weight: optional (K,) class weights (``canvas_class_weights``, see
            :func:`~monai_wsi_ext.data.features.canvas_class_weights`).
        nolabel_weight: loss weight of nolabel tissue cells (``canvas_nolabel_weight``); None ignores them.
        ignore_index: target value that is ignored.
        reduction: ``mean``, ``sum`` or ``none``.

    Raises:
        ConfigError: for a negative or non-finite ``nolabel_weight``.
    """

    def __init__(self, weight: torch.Tensor | None = None, nolabel_weight: float | None = None,
                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction)
        if nolabel_weight is not None and not (math.isfinite(float(nolabel_weight)) and float(nolabel_weight) >= 0):
            raise ConfigError(f"`canvas_nolabel_weight` must be null or a finite weight >= 0, got {nolabel_weight!r}.")
        self.nolabel_weight = None if nolabel_weight is None else float(nolabel_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.nolabel_weight is None:
            return super().forward(input, target)
        nolabel = target <= NOLABEL_TARGET_BASE
        target = torch.where(nolabel, NOLABEL_TARGET_BASE - target, target)
        ce = nn.functional.cross_entropy(input, target, ignore_index=self.ignore_index, reduction="none")
        valid = target != self.ignore_index
        w = valid.to(ce.dtype)
        if self.weight is not None:
            w = w * self.weight.to(ce.dtype)[torch.where(valid, target, 0)]
        w = torch.where(nolabel, w * self.nolabel_weight, w)
        if self.reduction == "none":
            return w * ce
        if self.reduction == "sum":
            return (w * ce).sum()
        return (w * ce).sum() / w.sum()


def canvas_loss(weight: torch.Tensor | None = None, nolabel_weight: float | None = None) -> CanvasCrossEntropyLoss:
    """Softmax cross-entropy over canvas cells, ignoring background and nolabel cells (:data:`IGNORE_INDEX`); see
    :class:`CanvasCrossEntropyLoss`."""
    return CanvasCrossEntropyLoss(weight=weight, nolabel_weight=nolabel_weight)
