"""Label-free pretraining of the patch encoder (issue 13 item 2): the autoencoder's reconstruction error falls on
real tissue patches, ``pretrain_encoder.json`` trains and saves the encoder, and ``train_encoder.json`` starts
from those weights (tensor equality)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _crc_patches(shared_data, size: int = 64) -> torch.Tensor:
    from PIL import Image

    folder = shared_data / "patches" / "crc"
    files = sorted(folder.glob("*.tif")) + sorted(folder.glob("*.png"))
    assert files
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def test_reconstruction_error_falls_on_real_patches(shared_data):
    from monai_wsi_ext.engines.pretrain import PatchAutoencoder, reconstruction_batch
    from monai_wsi_ext.model.networks import PatchEncoder

    torch.manual_seed(0)
    x = _crc_patches(shared_data)
    ae = PatchAutoencoder(PatchEncoder("googlenet"), recon_size=16, channels=64)
    prepare = reconstruction_batch(16)
    image, target = prepare({"image": x})
    assert target.shape == (len(x), 3, 16, 16)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    losses = []
    ae.train()
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ae(image), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    # the backbone is what learns (the supervised stage keeps it)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ae.encoder.backbone.parameters())


def test_bad_settings():
    from monai_wsi_ext.engines.pretrain import PatchAutoencoder, pretrain_items
    from monai_wsi_ext.model.networks import PatchEncoder

    with pytest.raises(ConfigError, match="power of two"):
        PatchAutoencoder(PatchEncoder("googlenet"), recon_size=24)
    with pytest.raises(ConfigError, match="no prepared slides"):
        pretrain_items(str(REPO / "no_such_folder"), ["training"])


def test_pretrain_config_then_supervised_start(prepared_dataset, tmp_path):
    from monai.bundle import ConfigParser, ConfigWorkflow

    from monai_wsi_ext.engines.pretrain import pretrain_items

    out, _ = prepared_dataset
    items = pretrain_items(str(out), ["training"])
    labelled = len(json.loads((out / "datalist.json").read_text())["training"])
    assert len(items) >= labelled  # nolabel tissue patches are used too
    ckpt = tmp_path / "models"
    overrides = dict(dataset_dir=str(out), ckpt_dir=str(ckpt), output_dir=str(tmp_path / "out"), crop_size=56,
                     patch_size=64, max_epochs=1, batch_size=16, samples_per_epoch=32, val_samples=16, recon_size=16,
                     num_workers=0, device="cpu")
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "pretrain_encoder.json")],
                        workflow_type=None, **overrides)
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert trainer.state.epoch == 1 and np.isfinite(evaluator.state.best_metric)
    saved = torch.load(ckpt / "encoder_pretrained.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("backbone.") for k in saved)
    assert not any(k.startswith(("decoder.", "project.")) for k in saved)
    assert (ckpt / "encoder_pretrain_resume.pt").is_file()
    # the supervised stage starts from the pretrained backbone
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train_encoder.json")])
    parser.update({"pretrained_path": str(ckpt / "encoder_pretrained.pt"), "device": "cpu"})
    network = parser.get_parsed_content("network")
    state = network.state_dict()
    backbone = [k for k in saved if k.startswith("backbone.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)


def test_pretraining_fits_the_input_normalisation_it_trains_with(prepared_dataset, tmp_path):
    """``--input_norm standardize``: pretraining fits the statistics on its own patches before the first step (it
    trained on unfitted ones before) and saves them with the encoder; the supervised stage loads them."""
    from monai.bundle import ConfigWorkflow

    from monai_wsi_ext.data.patches import PatchDataset, make_patch_transform

    out, _ = prepared_dataset
    ckpt = tmp_path / "models"
    overrides = dict(dataset_dir=str(out), ckpt_dir=str(ckpt), output_dir=str(tmp_path / "out"), crop_size=56,
                     patch_size=64, max_epochs=1, batch_size=16, samples_per_epoch=32, val_samples=16, recon_size=16,
                     num_workers=0, device="cpu", input_norm="standardize")
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "pretrain_encoder.json")],
                        workflow_type=None, **overrides)
    wf.initialize()
    items = wf.parser.get_parsed_content("train#items")
    assert len(items) == 32  # fewer than the fit's 1024: every pretraining patch is measured
    ds = PatchDataset(items, transform=make_patch_transform(False, 56))
    pixels = np.stack([ds[i]["image"].numpy() for i in range(len(ds))])  # (N, 3, H, W) in [0, 1]
    norm = wf.parser.get_parsed_content("encoder").input_norm
    np.testing.assert_allclose(norm.mean.flatten().numpy(), pixels.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(norm.std.flatten().numpy(), pixels.std(axis=(0, 2, 3)), rtol=1e-3)
    wf.run()
    saved = torch.load(ckpt / "encoder_pretrained.pt", map_location="cpu", weights_only=True)
    assert torch.equal(saved["input_norm.mean"], norm.mean.cpu())


def test_contrastive_loss_falls_and_views_differ(shared_data):
    """SimCLR on real CRC patches: the two views of a patch differ, the NT-Xent loss falls, the backbone learns."""
    from monai_wsi_ext.data.patches import make_patch_transform
    from monai_wsi_ext.engines.pretrain import PairContrastiveLoss, PatchSimCLR, TwoViews, views_batch
    from monai_wsi_ext.model.networks import PatchEncoder

    torch.manual_seed(0)
    raw = (_crc_patches(shared_data, 64) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    views = TwoViews(make_patch_transform(True, 56, colour_shift=0.05, colour_scale=0.2)).set_random_state(0)
    batch = torch.stack([views(r) for r in raw])
    assert batch.shape == (len(raw), 2, 3, 56, 56) and not torch.equal(batch[:, 0], batch[:, 1])
    fixed = TwoViews(make_patch_transform(True, 56), seed_from_pixels=True)
    assert torch.equal(fixed(raw[0]), fixed(raw[0]))  # validation views repeat
    model, loss_fn = PatchSimCLR(PatchEncoder("small_cnn"), projection_dim=32), PairContrastiveLoss(0.5)
    x, target = views_batch()({"image": batch})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.backbone.parameters())
    with pytest.raises(ConfigError, match="temperature"):
        PairContrastiveLoss(0.0)


def test_simclr_config_saves_a_pretrained_encoder(prepared_dataset, tmp_path):
    from monai.bundle import ConfigWorkflow

    out, _ = prepared_dataset
    ckpt = tmp_path / "models"
    overrides = dict(dataset_dir=str(out), ckpt_dir=str(ckpt), output_dir=str(tmp_path / "out"), crop_size=56,
                     patch_size=64, max_epochs=1, batch_size=16, samples_per_epoch=32, val_samples=16,
                     num_workers=0, device="cpu", backbone="small_cnn")
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "pretrain_encoder.json"),
                                     str(CONFIGS / "pretrain_encoder_simclr.json")], workflow_type=None, **overrides)
    wf.initialize()
    wf.run()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert np.isfinite(evaluator.state.best_metric) and evaluator.state.best_metric > 0  # the NT-Xent loss
    saved = torch.load(ckpt / "encoder_pretrained.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("backbone.") for k in saved) and not any(k.startswith("projection.") for k in saved)
