"""Patch transforms, datasets, the balanced sampler and per-slide patch sources (monai_wsi_ext.data.patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from monai_wsi_ext.data.patches import (
    EvalTransform,
    PaperAugment,
    PatchDataset,
    SlidePatchSource,
    StainNormalize,
    adjust_colour_batch,
    balanced_sampler,
    load_datalist,
    make_patch_transform,
)
from monai_wsi_ext.prep.prepare import load_prepared_slides
from monai_wsi_ext.errors import ConfigError


def _raw(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_colour_ops_match_torchvision():
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    f = torch.tensor([0.75, 1.0, 1.25])
    out = adjust_colour_batch(x.clone(), f, f.flip(0), f * 0 + 0.9, f)
    for i in range(3):
        ref = TF.adjust_saturation(x[i], float(f[i]))
        ref = TF.adjust_contrast(ref, float(f.flip(0)[i]))
        ref = TF.adjust_brightness(ref, 0.9)
        ref = TF.adjust_sharpness(ref, float(f[i]))
        assert torch.allclose(out[i], ref, atol=1e-6)


def test_paper_augment_replays_from_seed_and_batch_equals_single():
    aug = PaperAugment(crop_size=24)
    raw = _raw()
    seeds = [11, 12, 13, 14, 15, 16]
    a = aug.apply_batch(raw, seeds)
    b = aug.apply_batch(raw, seeds)
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)  # the end-to-end re-run gets the same pixels
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    for i, s in enumerate(seeds):
        aug.set_random_state(s)
        assert torch.equal(aug(raw[i]), a[i])
    c = aug.apply_batch(raw, [s + 100 for s in seeds])
    assert not torch.equal(a, c)


def test_paper_augment_geometry_without_colour():
    """With colour factors fixed at 1, the output is a crop of the patch rotated by k*90 degrees, maybe flipped."""
    aug = PaperAugment(crop_size=None, factor_range=(1.0, 1.0))
    raw = _raw(1, 16)
    out = aug.apply_batch(raw, [3])[0]
    src = torch.from_numpy(raw[0]).permute(2, 0, 1).float() / 255
    candidates = [torch.rot90(src, k, (1, 2)) for k in range(4)]
    candidates += [torch.flip(c, (2,)) for c in candidates]
    assert any(torch.allclose(out, c, atol=1e-6) for c in candidates)


def test_eval_transform_centre_crop_is_deterministic():
    raw = _raw(2, 10)
    t = EvalTransform(crop_size=6)
    out = t.apply_batch(raw)
    assert out.shape == (2, 3, 6, 6)
    assert torch.allclose(out[0], torch.from_numpy(raw[0, 2:8, 2:8]).permute(2, 0, 1).float() / 255)
    assert torch.equal(out[1], t(raw[1]))
    with pytest.raises(ValueError, match="crop_size"):
        EvalTransform(crop_size=12)(raw[0])


def test_stain_normalize_on_real_patch(shared_data):
    patch = np.asarray(Image.open(shared_data / "patches" / "crc" / "TUM-TCGA-DRHQMTQA.png").convert("RGB"))
    out = StainNormalize()(patch)
    assert out.shape == patch.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - patch).mean() > 1.0  # the stains were changed
    blank = np.full((32, 32, 3), 250, np.uint8)
    assert np.array_equal(StainNormalize()(blank), blank)  # too little stain to estimate: passed through
    t = make_patch_transform(False, crop_size=200, stain_normalize=True)
    assert t(patch).shape == (3, 200, 200)


def test_balanced_sampler_draws_classes_equally():
    labels = [0] * 90 + [1] * 10
    sampler = balanced_sampler(labels, num_samples=4000, seed=1)
    drawn = np.array(labels)[list(iter(sampler))]
    assert abs(drawn.mean() - 0.5) < 0.05


def test_patch_dataset_reads_datalist_and_drops_nolabel(prepared_dataset):
    out, _ = prepared_dataset
    items = load_datalist(out / "datalist.json", "training")
    assert items and all(i["label"] in (0, 1) for i in items)
    with_nolabel = items + [dict(items[0], label=-1)]
    ds = PatchDataset(with_nolabel, transform=EvalTransform(None))
    assert len(ds) == len(items)
    sample = ds[0]
    assert sample["image"].shape == (3, 64, 64) and int(sample["label"]) == items[0]["label"]
    with pytest.raises(ConfigError, match="no split"):
        load_datalist(out / "datalist.json", "nonexistent")


def test_slide_patch_source_rereads_same_pixels(prepared_dataset):
    out, _ = prepared_dataset
    meta = load_prepared_slides(out, "training")[0]
    src = SlidePatchSource.from_prepared(meta, make_patch_transform(True, crop_size=56))
    idx = torch.tensor([0, 3, 5, 7])
    seeds = torch.tensor([1, 2, 3, 4])
    a, b = src.load(idx, seeds), src.load(idx, seeds)
    assert a.shape == (4, 3, 56, 56) and torch.equal(a, b)
    # the raw reads follow the patch table: cell (row, col) at level-0 (x, y) = (col, row) * cell size
    grid = meta.grid
    raw = src.read_raw([5])
    direct = src.slide.read_region(int(grid.x[5]), int(grid.y[5]), 64, 64, 0)
    assert np.array_equal(raw[0], direct)
    # the prefetching iterator yields every patch once, in table order
    plain = SlidePatchSource.from_prepared(meta, EvalTransform(None))
    seen = [i for batch_idx, _ in plain.iter_batches(batch_size=16) for i in batch_idx]
    assert seen == list(range(len(plain)))


def test_datalist_serves_monai_patchwsidataset_with_the_same_pixels(prepared_dataset):
    """The prepared datalist is in MONAI's ``PatchWSIDataset`` format (top-left ``location``: pass
    ``center_location=False``); MONAI's dataset with its cuCIM reader gives exactly the pixels the project's
    ``PatchDataset`` reads through its own slide reader."""
    from monai.data import PatchWSIDataset

    out, _ = prepared_dataset
    items = load_datalist(out / "datalist.json", "training")[:4]
    ours = PatchDataset(items)
    theirs = PatchWSIDataset(items, reader="cuCIM", center_location=False, include_label=True)
    for i in range(len(items)):
        monai_img = np.asarray(theirs[i]["image"], dtype=np.float32) / 255.0
        np.testing.assert_array_equal(monai_img, ours[i]["image"].numpy())
        assert int(np.asarray(theirs[i]["label"]).ravel()[0]) == int(ours[i]["label"])
