"""The review article's colour augmentation (issue 13 item 3): per-channel shift and scale in RGB or HED space,
combined with the paper's augmentation, replayable from the per-patch seed, and off by default without changing
the paper's random draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_wsi_ext.data.patches import PaperAugment, channel_colour_batch, make_patch_transform
from monai_wsi_ext.errors import ConfigError


def _patches(n: int = 6, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(40, 220, size=(n, size, size, 3), dtype=np.uint8)


def test_default_draws_and_pixels_are_the_papers():
    raw = _patches()
    seeds = [11, 12, 13, 14, 15, 16]
    plain = PaperAugment(32).apply_batch(raw, seeds)
    off = make_patch_transform(True, 32, colour_shift=0.0, colour_scale=0.0).apply_batch(raw, seeds)
    assert torch.equal(plain, off)
    p = PaperAugment(32)._draw(np.random.RandomState(5), 40, 40)
    assert "shift" not in p and "scale" not in p  # no extra draw: seeds replay as before


@pytest.mark.parametrize("space", ["rgb", "hed"])
def test_replay_from_the_seed_gives_identical_pixels(space):
    raw = _patches()
    aug = PaperAugment(32, colour_shift=0.05, colour_scale=0.1, colour_space=space)
    seeds = [3, 1, 4, 1, 5, 9]
    first, again = aug.apply_batch(raw, seeds), aug.apply_batch(raw, seeds)
    assert torch.equal(first, again)  # the end-to-end step re-reads a patch and must see the same pixels
    assert not torch.equal(first, PaperAugment(32).apply_batch(raw, seeds))
    assert not torch.equal(first[0], aug.apply_batch(raw, [100, 1, 4, 1, 5, 9])[0])
    assert first.min() >= 0 and first.max() <= 1


def test_rgb_shift_and_scale_per_channel():
    img = torch.full((1, 3, 4, 4), 0.5)
    out = channel_colour_batch(img, torch.tensor([[0.1, 0.0, -0.1]]), torch.tensor([[1.0, 1.2, 1.0]]))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.6, 0.4]))


def test_hed_identity_round_trip_and_haematoxylin_shift():
    img = torch.rand(2, 3, 8, 8) * 0.8 + 0.1
    same = channel_colour_batch(img, torch.zeros(2, 3), torch.ones(2, 3), "hed")
    torch.testing.assert_close(same, img, atol=1e-5, rtol=0)
    more_h = channel_colour_batch(img, torch.tensor([[0.3, 0.0, 0.0]] * 2), torch.ones(2, 3), "hed")
    # more haematoxylin absorbs red and green more than blue: the image darkens and turns bluer
    assert (more_h[:, 0] < img[:, 0]).float().mean() > 0.9
    assert (more_h[:, 2] - more_h[:, 0]).mean() > (img[:, 2] - img[:, 0]).mean()


def test_bad_settings():
    with pytest.raises(ConfigError, match="colour_space"):
        PaperAugment(32, colour_space="lab")
    with pytest.raises(ConfigError, match="colour_scale"):
        PaperAugment(32, colour_scale=1.5)


def test_train_encoder_config_passes_the_options():
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "common.json"), str(configs / "train_encoder.json")])
    parser.update({"colour_shift": 0.05, "colour_scale": 0.1, "colour_space": "hed"})
    aug = parser.get_parsed_content("train#preprocessing")
    aug = getattr(aug, "main", aug)
    assert (aug.colour_shift, aug.colour_scale, aug.colour_space) == (0.05, 0.1, "hed")


def test_e2e_replays_the_colour_augmentation(prepared_dataset):
    """The end-to-end step reads each patch twice (canvas pass, gradient pass): with the colour augmentation on,
    the same per-patch seeds give identical pixels on every read, and ``train_e2e.json`` passes the options."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    from monai_wsi_ext.data.patches import E2ESlideDataset

    prepared, _ = prepared_dataset
    colour = {"colour_shift": 0.05, "colour_scale": 0.2, "colour_space": "hed"}
    item = E2ESlideDataset(str(prepared), split="training", crop_size=56, backend="cucim", num_workers=0,
                           **colour)[0]
    plain = E2ESlideDataset(str(prepared), split="training", crop_size=56, backend="cucim", num_workers=0)[0]
    index, seeds = torch.arange(8), torch.arange(100, 108)
    first = item["patch_source"].load(index, seeds)
    again = item["patch_source"].load(index, seeds)
    assert torch.equal(first, again)
    assert not torch.allclose(first, plain["patch_source"].load(index, seeds))  # the colour change is applied
    assert not torch.equal(first, item["patch_source"].load(index, seeds + 1))
    with pytest.raises(ConfigError, match="colour_space"):
        E2ESlideDataset(str(prepared), split="training", colour_space="lab")

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "common.json"), str(configs / "train_e2e.json")])
    parser.update({**colour, "dataset_dir": str(prepared)})
    assert parser.get_parsed_content("train#dataset").colour == colour
