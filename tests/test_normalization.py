"""Input and stain normalisation stored with the encoder (issue 13 items 4 and 5): the fixed modes, statistics
fitted on training patches, Reinhard's colour transfer to a reference, and both surviving checkpoints, TorchScript
and the bundle configs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.networks import PatchEncoder
from monai_wsi_ext.model.normalization import (IMAGENET_MEAN, IMAGENET_STD, InputNormalization,
                                               ReinhardNormalization, fit_encoder_normalization,
                                               fit_reinhard_target, lab_to_rgb, rgb_to_lab)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def _image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255.0


def test_default_encoder_is_unchanged():
    torch.manual_seed(0)
    enc = PatchEncoder("small_cnn").eval()
    assert not [k for k in enc.state_dict() if k.startswith(("input_norm", "stain_norm"))]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.features(x), enc.feature(enc.backbone(x)))


@pytest.mark.parametrize("mode, mean, std", [("symmetric", (0.5,) * 3, (0.5,) * 3),
                                              ("imagenet", IMAGENET_MEAN, IMAGENET_STD)])
def test_fixed_modes(mode, mean, std):
    x = torch.rand(2, 3, 8, 8)
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(InputNormalization(mode)(x), want)
    with pytest.raises(ConfigError, match="input_norm"):
        InputNormalization("zscore")
    with pytest.raises(ConfigError, match="input_stain_norm"):
        PatchEncoder("small_cnn", input_stain_norm="macenko")


def test_lab_conversion_matches_scikit_image():
    from skimage.color import rgb2lab

    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    ours = rgb_to_lab(x)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - rgb2lab(x[0].permute(1, 2, 0).numpy())).max() < 0.01  # white point rounding
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-9)


def test_reinhard_maps_patches_to_the_reference(shared_data):
    crc = shared_data / "patches" / "crc"
    reference = sorted(crc.glob("TUM-*.png"))[0]
    mean, std = fit_reinhard_target(reference, tissue_threshold=1.01)  # every pixel, to compare below
    norm = ReinhardNormalization(True)
    norm.set_target(mean, std)
    patch = _image(sorted(crc.glob("NORM-*.png"))[0])
    out = norm(patch)
    lab = rgb_to_lab(out.double())[0].reshape(3, -1)
    assert np.allclose(lab.mean(1).numpy(), mean, atol=1.5)  # clipping to the RGB gamut moves it a little
    assert np.allclose(lab.std(1).numpy(), std, rtol=0.1)
    # a differently stained copy of the same patch lands on (nearly) the same colours
    restained = (patch * torch.tensor([0.85, 1.0, 1.1]).view(1, 3, 1, 1) + 0.03).clamp(0, 1)
    before = (restained - patch).abs().mean()
    after = (norm(restained) - out).abs().mean()
    assert after < 0.35 * before, (float(before), float(after))
    with pytest.raises(ConfigError, match="does not exist"):
        fit_reinhard_target(crc / "missing.png")


def _fitted_encoder(shared_data) -> PatchEncoder:
    torch.manual_seed(0)
    enc = PatchEncoder("small_cnn", input_norm="standardize", input_stain_norm="reinhard").eval()
    ref = sorted((shared_data / "patches" / "crc").glob("TUM-*.png"))[0]
    enc.stain_norm.set_target(*fit_reinhard_target(ref))
    enc.input_norm.set_statistics([0.6, 0.45, 0.65], [0.2, 0.25, 0.15])
    return enc


def test_checkpoint_and_torchscript_carry_the_normalisation(shared_data, tmp_path):
    enc = _fitted_encoder(shared_data)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    # a default-config encoder takes the checkpoint's normalisation (strict load, nothing missing or unexpected)
    plain = PatchEncoder("small_cnn").eval()
    plain.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True), strict=True)
    assert plain.input_norm.mode == "standardize" and plain.stain_norm.active
    x = _image(sorted((shared_data / "patches" / "crc").glob("STR-*.png"))[0])[..., :64, :64]
    with torch.no_grad():
        assert torch.equal(plain.features(x), enc.features(x))
        scripted = torch.jit.script(plain)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        assert torch.allclose(loaded.features(x), enc.features(x), atol=1e-6)
    # an encoder asked for `standardize` refuses a checkpoint without statistics
    old = PatchEncoder("small_cnn").state_dict()
    with pytest.raises(RuntimeError, match="input_norm.mean"):
        PatchEncoder("small_cnn", input_norm="standardize").load_state_dict(old, strict=True)


def test_standardize_is_fitted_on_training_patches(prepared_dataset):
    from monai_wsi_ext.data.patches import PatchDataset, load_datalist, make_patch_transform

    prepared, _ = prepared_dataset
    datalist = load_datalist(Path(prepared) / "datalist.json", "training")
    enc = PatchEncoder("small_cnn", input_norm="standardize")
    fit_encoder_normalization(enc, datalist, crop_size=56, max_patches=len(datalist) + 10, backend="cucim")
    # independent: every training patch read and averaged here
    ds = PatchDataset(datalist, transform=make_patch_transform(False, 56), backend="cucim")
    pixels = np.stack([ds[i]["image"].numpy() for i in range(len(ds))]).transpose(1, 0, 2, 3).reshape(3, -1)
    assert np.allclose(enc.input_norm.mean.flatten().numpy(), pixels.mean(1), atol=1e-4)
    assert np.allclose(enc.input_norm.std.flatten().numpy(), pixels.std(1, ddof=1), atol=1e-4)
    with pytest.raises(ConfigError, match="stain_reference"):
        fit_encoder_normalization(PatchEncoder("small_cnn", input_stain_norm="reinhard"), datalist)


def test_bundle_configs_pass_and_fit_the_normalisation(prepared_dataset, shared_data):
    from monai.bundle import ConfigParser

    prepared, _ = prepared_dataset
    ref = sorted((shared_data / "patches" / "crc").glob("TUM-*.png"))[0]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train_encoder.json")])
    parser.update({"dataset_dir": str(prepared), "backbone": "small_cnn", "crop_size": 56, "input_norm": "standardize",
                   "input_stain_norm": "reinhard", "stain_reference": str(ref), "backend": "cucim"})
    net = parser.get_parsed_content("network")
    assert net.input_norm.mode == "standardize" and net.stain_norm.active and not net.stain_norm.fitted
    fit = [e for e in parser.get("initialize") if "fit_encoder_normalization" in e]
    assert len(fit) == 1
    index = parser.get("initialize").index(fit[0])
    parser.get_parsed_content(f"initialize#{index}")
    assert net.stain_norm.fitted
    assert np.allclose(net.stain_norm.target_mean.flatten().tolist(), fit_reinhard_target(ref)[0], atol=1e-4)
    assert not torch.allclose(net.input_norm.std, torch.ones(1, 3, 1, 1))


def test_normalisation_survives_onnx_export_and_the_deploy_loader(shared_data, tmp_path):
    """The bundle's ONNX export of a checkpoint with ``standardize`` statistics and a Reinhard target (both in the
    graph), from a default config (the checkpoint's normalisation is taken, as in inference), loaded by the MONAI
    Deploy application's model loader, gives the eager encoder's features; without the normalisation they differ."""
    pytest.importorskip("onnxruntime")
    from monai_wsi_ext.deploy.models import load_exported_models
    from monai_wsi_ext.export.bundle import export_onnx_network

    enc = _fitted_encoder(shared_data)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    export_onnx_network("encoder", tmp_path / "encoder.pt", tmp_path / "models" / "encoder.onnx",
                        bundle_root=CONFIGS.parent, backbone="small_cnn", patch_size=64, crop_size=64)
    models = load_exported_models(tmp_path / "models", runtime="onnxruntime")
    assert models.unet is None
    x = _image(sorted((shared_data / "patches" / "crc").glob("STR-*.png"))[0])[..., :64, :64]
    with torch.no_grad():
        want = enc.features(x)
        got = models.encoder.features(x)
        plain = enc.feature(enc.backbone(x))  # neither normalisation
    assert float((got - want).abs().max()) < 1e-5
    assert float((plain - want).abs().max()) > 1e-3
