"""Backbones for :class:`~monai_wsi_ext.model.networks.PatchEncoder` beyond the paper's GoogLeNet and DenseNet121.

Every backbone is a module whose ``forward`` gives a pooled ``(B, out_features)`` vector and which has an
``out_features`` attribute; the encoder adds its ``feature_dim`` layer and 2-class head on top, so checkpoints,
export, feature extraction and inference treat them all alike. Nothing is downloaded: networks are built with
random weights, and local pretrained weights are loaded by ``PatchEncoder(pretrained_path=...)`` (torchvision
state dicts load into ``backbone``; their classifier tensors are reported as unexpected and skipped).

Names:

- any torchvision classification model by its builder name (``resnet18``, ``resnet34``, ``resnet50``, ``vgg16``,
  ``vgg16_bn``, ``efficientnet_b0``, ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``convnext_tiny``...): the
  final classification layer is replaced by an identity;
- MONAI classification nets as ``monai:<name>`` (``monai:densenet121``, ``monai:densenet169``, ``monai:seresnet50``,
  ``monai:efficientnet-b0``);
- ``small_cnn``: four conv blocks (32-64-128-256 channels), for fast CPU work from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_wsi_ext.errors import ConfigError

__all__ = ["SmallCNN", "build_backbone", "torchvision_backbone_names", "MONAI_BACKBONES"]

#: MONAI classification networks offered as ``monai:<name>``
MONAI_BACKBONES = ("densenet121", "densenet169", "seresnet50", "efficientnet-b0")


class SmallCNN(nn.Module):
    """Four (3x3 conv, batch norm, ReLU, 2x2 max-pool) blocks and global average pooling: a 256-d vector."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.out_features = int(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.flatten(self.pool(self.features(x)), 1))


def torchvision_backbone_names() -> list[str]:
    """The torchvision classification model builders (``torchvision.models.list_models``)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _pooled(net: nn.Module, out_features: int) -> nn.Module:
    """``net`` (whose final linear layer is now an identity, so it returns the flattened pooled vector) with its
    ``out_features``; the state dict keys stay the torchvision/MONAI ones, so their weight files load into it."""
    net.out_features = int(out_features)
    return net


def _strip_torchvision(net: nn.Module, name: str) -> nn.Module:
    """Replace the final linear layer of a torchvision classifier by an identity; record its input width."""
    for attr in ("fc", "classifier", "heads", "head"):
        last = getattr(net, attr, None)
        if last is None:
            continue
        if isinstance(last, nn.Linear):
            setattr(net, attr, nn.Identity())
            return _pooled(net, last.in_features)
        if isinstance(last, nn.Sequential):
            linears = [i for i, m in enumerate(last) if isinstance(m, nn.Linear)]
            if linears:
                idx = linears[-1]
                width = last[idx].in_features
                last[idx] = nn.Identity()
                return _pooled(net, width)
    raise ConfigError(f"backbone {name!r}: cannot find the final linear layer of this torchvision model")


def _monai_backbone(name: str, dropout: float) -> nn.Module:
    from monai.networks import nets

    if name not in MONAI_BACKBONES:
        raise ConfigError(f"MONAI backbone {name!r} is not offered; choose one of {list(MONAI_BACKBONES)}")
    if name.startswith("densenet"):
        net = getattr(nets, name.replace("densenet", "DenseNet"))(spatial_dims=2, in_channels=3, out_channels=1,
                                                                  dropout_prob=float(dropout))
        width = net.class_layers.out.in_features
        net.class_layers.out = nn.Identity()
        return _pooled(net, width)
    if name == "seresnet50":
        net = nets.SEResNet50(spatial_dims=2, in_channels=3, num_classes=1, dropout_prob=float(dropout) or None)
        width = net.last_linear.in_features
        net.last_linear = nn.Identity()
        return _pooled(net, width)
    net = nets.EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=3, num_classes=1)
    width = net._fc.in_features
    net._fc = nn.Identity()
    return _pooled(net, width)


def build_backbone(name: str, dropout: float = 0.0) -> nn.Module:
    """A randomly initialised backbone giving a pooled vector (see the module doc for the names).

    Raises:
        ConfigError: an unknown name, naming the choices.
    """
    if name == "small_cnn":
        return SmallCNN(dropout=dropout)
    if name.startswith("monai:"):
        return _monai_backbone(name[len("monai:"):], dropout)
    import torchvision.models as tvm

    names = torchvision_backbone_names()
    if name not in names:
        raise ConfigError(f"unknown backbone {name!r}: use googlenet, densenet121, small_cnn, monai:<"
                          f"{'|'.join(MONAI_BACKBONES)}> or a torchvision classification model "
                          f"(e.g. resnet18, resnet50, vgg16_bn, efficientnet_b0, mobilenet_v3_large, convnext_tiny)")
    kwargs = {"weights": None}
    if dropout and name.startswith(("efficientnet", "mobilenet", "vgg")):
        kwargs["dropout"] = float(dropout)
    net = tvm.get_model(name, **kwargs)
    return _strip_torchvision(net, name)
