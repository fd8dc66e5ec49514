"""Pretraining the patch encoder without labels: a convolutional autoencoder (``bundle/configs/pretrain_encoder.json``)
or SimCLR-style contrastive learning (``bundle/configs/pretrain_encoder_simclr.json``).

The article on segmentation deep learning for pathology (``../shared/reference/001_*``) names two ways to start a
non-convex training well when labels are few and no pretrained weights can be downloaded: transfer learning, and an
autoencoder that reconstructs the inputs before the supervised stage. :class:`PatchAutoencoder` is the second: its
encoder is the bundle's :class:`~monai_wsi_ext.model.networks.PatchEncoder` (the chosen backbone's pooled vector),
and a small decoder reconstructs the (augmented, downsampled) tissue patch from that vector. Labels are ignored, so
every tissue patch of the prepared splits may be used, ``nolabel`` ones included.

The best encoder (lowest validation reconstruction error) is saved as a plain ``PatchEncoder`` state dict
(``encoder_pretrained.pt``; its feature layer and head are still at their initialisation): ``train_encoder.json``
starts from it with ``--pretrained_path <ckpt_dir>/encoder_pretrained.pt``.

:class:`PatchSimCLR` is the contrastive alternative (Chen et al. 2020): two augmented views of every patch
(:class:`TwoViews`: the bundle's training augmentation drawn twice), the backbone vector and a small projection
MLP, and MONAI's ``ContrastiveLoss`` (NT-Xent) pulling the two views of a patch together and pushing the other
patches of the batch away (:class:`PairContrastiveLoss`). It saves the same kind of ``encoder_pretrained.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.networks import PatchEncoder

__all__ = ["PatchAutoencoder", "reconstruction_batch", "pretrain_items", "PatchSimCLR", "TwoViews",
           "PairContrastiveLoss", "views_batch"]


class PatchAutoencoder(nn.Module):
    """Patch -> backbone vector -> reconstruction of the patch at ``recon_size`` x ``recon_size``.

    Args:
        encoder: the patch encoder whose backbone is pretrained (its ``backbone`` gives the pooled vector).
        recon_size: side of the reconstructed image (a power of two, at least 8); the target is the input patch
            resized to it (area interpolation), so the decoder stays small on a CPU.
        channels: channels of the decoder's first feature map (halved at every upsampling, at least 16).

    The decoder maps the pooled vector to a ``channels x 4 x 4`` map and doubles it with (upsample, 3x3 conv,
    batch norm, ReLU) blocks to ``recon_size``; a 1x1 conv and a sigmoid give RGB in [0, 1], the range of the
    bundle's patch transforms.
    """

    def __init__(self, encoder: PatchEncoder, recon_size: int = 32, channels: int = 128):
        super().__init__()
        recon_size = int(recon_size)
        steps = math.log2(recon_size / 4) if recon_size >= 8 else -1
        if steps < 1 or steps != int(steps):
            raise ConfigError(f"`recon_size` must be a power of two of at least 8, got {recon_size}.")
        self.encoder = encoder
        self.recon_size = recon_size
        width = int(channels)
        self.project = nn.Linear(encoder.backbone.out_features, width * 16)
        blocks: list[nn.Module] = []
        for _ in range(int(steps)):
            out = max(width // 2, 16)
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        self.decoder = nn.Sequential(*blocks, nn.Conv2d(width, 3, 1), nn.Sigmoid())
        self._width = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) patches in [0, 1] -> (B, 3, recon_size, recon_size) reconstructions in [0, 1]."""
        code = self.encoder.backbone(x)
        return self.decoder(self.project(code).view(-1, self._width, 4, 4))


def reconstruction_batch(recon_size: int = 32):
    """A ``prepare_batch`` for MONAI's ``SupervisedTrainer``/``SupervisedEvaluator``: the patch is the input and
    the patch resized to ``recon_size`` (area interpolation) is the target; the label is not used."""

    def prepare(batchdata, device=None, non_blocking: bool = False, **kwargs):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        target = F.interpolate(image, size=(int(recon_size),) * 2, mode="area")
        return image, target

    return prepare


def pretrain_items(dataset_dir: str, splits: Sequence[str] = ("training", "validation"),
                   max_items: int | None = None, seed: int = 0) -> list[dict]:
    """Every tissue patch of the prepared slides of ``splits`` as ``PatchWSIDataset``-style items, ``nolabel``
    ones included (labels are ignored; the label field is set to 0 so MONAI's collation works).

    Args:
        dataset_dir: a ``prepare_dataset`` output folder.
        splits: the splits whose slides are used.
        max_items: draw at most this many patches (seeded, without replacement); None: all.
        seed: seed of that draw.

    Raises:
        ConfigError: no prepared slide in those splits, or no patch.
    """
    import numpy as np

    from monai_wsi_ext.prep.prepare import datalist_items, load_prepared_slides

    slides = load_prepared_slides(dataset_dir, list(splits))
    if not slides:
        raise ConfigError(f"{dataset_dir}: no prepared slides in the splits {list(splits)} to pretrain on")
    items = [{**item, "label": 0} for p in slides
             for item in datalist_items(p.meta, dataset_dir, include_nolabel=True)]
    if not items:
        raise ConfigError(f"{dataset_dir}: the slides of {list(splits)} have no tissue patches")
    if max_items is not None and len(items) > int(max_items):
        keep = np.random.default_rng(int(seed)).choice(len(items), int(max_items), replace=False)
        items = [items[i] for i in sorted(keep)]
    return items


class TwoViews:
    """Two independent draws of a random patch transform on the same patch: ``(2, 3, h, w)``.

    Args:
        transform: the training augmentation (:func:`~monai_wsi_ext.data.patches.make_patch_transform` with
            ``train=True``).
        seed_from_pixels: draw each patch's two views from a random state seeded by its pixels (a CRC32), so the
            views of a patch are the same on every pass: for validation.
    """

    def __init__(self, transform, seed_from_pixels: bool = False):
        self.transform, self.seed_from_pixels = transform, bool(seed_from_pixels)
        self.crop_size = getattr(getattr(transform, "main", transform), "crop_size", None)

    def set_random_state(self, seed=None, state=None):
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, img) -> torch.Tensor:
        if self.seed_from_pixels:
            import zlib

            import numpy as np

            self.transform.set_random_state(zlib.crc32(np.ascontiguousarray(img).tobytes()))
        return torch.stack([self.transform(img), self.transform(img)])


class PatchSimCLR(nn.Module):
    """Two views per patch -> backbone vector -> projection MLP (Linear, ReLU, Linear).

    Args:
        encoder: the patch encoder whose backbone is pretrained.
        projection_dim: width of the projection the loss compares.
        hidden: width of the MLP's hidden layer.
    """

    def __init__(self, encoder: PatchEncoder, projection_dim: int = 64, hidden: int = 256):
        super().__init__()
        if int(projection_dim) < 2 or int(hidden) < 2:
            raise ConfigError(f"`projection_dim` and `hidden` must be at least 2, got {projection_dim}, {hidden}.")
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(encoder.backbone.out_features, int(hidden)), nn.ReLU(inplace=True),
                                        nn.Linear(int(hidden), int(projection_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3, H, W) pairs of views -> (B, 2, projection_dim)."""
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"PatchSimCLR expects (B, 2, 3, H, W) pairs of views, got {tuple(x.shape)}")
        b = x.shape[0]
        z = self.projection(self.encoder.backbone(x.flatten(0, 1)))
        return z.view(b, 2, -1)


class PairContrastiveLoss(nn.Module):
    """MONAI's ``ContrastiveLoss`` (NT-Xent) between the two views of ``(B, 2, D)`` projections; the target
    argument of the trainer's loss call is ignored."""

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        from monai.losses import ContrastiveLoss

        if float(temperature) <= 0:
            raise ConfigError(f"`temperature` must be positive, got {temperature}.")
        self.loss = ContrastiveLoss(temperature=float(temperature))

    def forward(self, pred: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(pred[:, 0], pred[:, 1])


def views_batch():
    """A ``prepare_batch`` for the contrastive trainer/evaluator: the ``(B, 2, 3, H, W)`` views are the input; the
    target is a placeholder (the loss compares the two views)."""

    def prepare(batchdata, device=None, non_blocking: bool = False, **kwargs):
        views = batchdata["image"].to(device=device, non_blocking=non_blocking)
        return views, torch.zeros(views.shape[0], device=views.device)

    return prepare
