"""Checkpoints must fit the network (issue 8, item 2): every tensor by name and shape, or a ConfigError that names
the option, the file, the expected backbone and what the checkpoint looks like. Partial loading is only for
``pretrained_path`` (backbone weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.networks import PatchEncoder, load_checkpoint, make_unet

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


@pytest.fixture(scope="module")
def googlenet():
    torch.manual_seed(0)
    return PatchEncoder("googlenet", feature_dim=16)


@pytest.fixture(scope="module")
def densenet_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "densenet_encoder.pt"
    torch.save({"model": PatchEncoder("densenet121", feature_dim=16).state_dict()}, path)
    return path


def _fresh_googlenet(feature_dim: int = 16, seed: int = 1) -> PatchEncoder:
    torch.manual_seed(seed)
    return PatchEncoder("googlenet", feature_dim=feature_dim)


def test_other_backbone_fails_naming_file_and_backbones(googlenet, densenet_ckpt):
    """Today: ``encoder: loaded 4 of ...`` with a warning, then heatmaps from a random encoder and exit 0."""
    with pytest.raises(ConfigError) as err:
        load_checkpoint(googlenet, densenet_ckpt, option="encoder_ckpt")
    msg = str(err.value)
    for part in ("`encoder_ckpt`", str(densenet_ckpt), "backbone 'googlenet'", "looks like a densenet121",
                 "729 tensors", "missing", "unexpected"):
        assert part in msg, (part, msg)


def test_inference_and_feature_extraction_refuse_other_backbone(googlenet, densenet_ckpt, tmp_path):
    from monai_wsi_ext.inference.features import FeatureExtractor
    from monai_wsi_ext.inference.slides import SlideInference

    inf = SlideInference(str(tmp_path / "heat"), googlenet, mode="classifier", encoder_checkpoint=str(densenet_ckpt),
                         slides=[str(tmp_path / "slide.tif")], device="cpu", channels_last=False)
    with pytest.raises(ConfigError, match="densenet121"):  # before any slide is read
        inf.run()
    assert not (tmp_path / "heat" / "inference_summary.json").exists()
    ext = FeatureExtractor(str(tmp_path / "prep"), str(tmp_path / "feat"), googlenet, checkpoint=str(densenet_ckpt),
                           device="cpu", channels_last=False)
    with pytest.raises(ConfigError, match="`encoder_ckpt`.*backbone 'googlenet'"):
        ext._load()


def test_missing_file_names_encoder_ckpt(googlenet, tmp_path):
    from monai_wsi_ext.inference.features import FeatureExtractor

    missing = tmp_path / "models" / "encoder.pt"
    ext = FeatureExtractor(str(tmp_path), str(tmp_path / "feat"), googlenet, checkpoint=str(missing), device="cpu")
    with pytest.raises(ConfigError) as err:
        ext._load()
    assert "`encoder_ckpt`" in str(err.value) and str(missing) in str(err.value)
    assert "pretrained_path" not in str(err.value)


def test_wrong_shape_tensor_fails(googlenet, tmp_path):
    path = tmp_path / "fd8.pt"
    torch.save(_fresh_googlenet(feature_dim=8).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(googlenet, path)
    msg = str(err.value)
    assert "3 with another shape" in msg and "'feature.weight': (8, 1024) in the file, (16, 1024)" in msg, msg
    assert "feature_dim 8" in msg  # what the checkpoint looks like


def test_correct_checkpoint_loads_bit_exactly(tmp_path):
    src = _fresh_googlenet(seed=2)
    path = tmp_path / "encoder.pt"
    torch.save({"model": src.state_dict()}, path)  # as CheckpointSaver writes it
    dst = _fresh_googlenet(seed=3)
    report = load_checkpoint(dst, path)
    want, got = src.state_dict(), dst.state_dict()
    assert sorted(report.loaded) == sorted(want) and not report.missing
    assert all(torch.equal(want[k], got[k]) for k in want)
    # drop_head (start of end-to-end training): everything but the head, which keeps its own values
    e2e = _fresh_googlenet(seed=4)
    head = e2e.head.weight.detach().clone()
    load_checkpoint(e2e, path, option="init_encoder_ckpt", drop_head=True)
    assert torch.equal(e2e.head.weight, head) and torch.equal(e2e.feature.weight, src.feature.weight)


def test_unet_of_other_channels_fails(tmp_path):
    from monai_wsi_ext.baselines.segmentation import SegmentationPredictor

    path = tmp_path / "unet.pt"
    torch.save(make_unet(channels=(8, 16, 32), strides=(2, 2), num_res_units=1).state_dict(), path)
    unet = make_unet(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(unet, path, option="unet_ckpt")
    msg = str(err.value)
    assert "`unet_ckpt`" in msg and str(path) in msg and "UNet" in msg and "(8, 16, 32, 64)" in msg, msg
    seg = SegmentationPredictor(str(tmp_path), str(tmp_path / "out"), make_unet(feature_dim=3, channels=(8, 16, 32, 64),
                                num_res_units=1), checkpoint=str(path), device="cpu")
    with pytest.raises(ConfigError, match="`seg_ckpt`"):
        seg.run()


def test_export_refuses_checkpoint_that_does_not_fit(tmp_path):
    from monai_wsi_ext.export.bundle import _eager_network, bundle_config_files

    path = tmp_path / "unet.pt"
    torch.save({"model": make_unet(channels=(8, 16, 32, 64), num_res_units=1).state_dict()}, path)
    files = bundle_config_files("unet", REPO / "bundle")
    with pytest.raises(ConfigError, match="`ckpt_file`"):
        _eager_network(files, None, str(path), "model", bundle_root=str(REPO / "bundle"))


def test_e2e_initialize_refuses_other_backbone(densenet_ckpt, tmp_path):
    """``train_e2e.json``'s ``initialize`` loads the separate checkpoints strictly."""
    from monai.bundle import ConfigParser

    unet = tmp_path / "unet.pt"
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train_e2e.json")])
    parser.update({"init_encoder_ckpt": str(densenet_ckpt), "init_unet_ckpt": str(unet), "device": "cpu"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("initialize")
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    msg = next(str(x) for x in chain if isinstance(x, ConfigError))
    assert "`init_encoder_ckpt`" in msg and "densenet121" in msg


def test_pretrained_path_partial_load_still_works(tmp_path):
    from torchvision.models import googlenet

    sd = googlenet(weights=None, aux_logits=False, init_weights=False).state_dict()
    sd["conv1.conv.weight"] = torch.full_like(sd["conv1.conv.weight"], 0.5)
    del sd["inception5b.branch1.conv.weight"]
    path = tmp_path / "imagenet_googlenet.pth"
    torch.save(sd, path)
    enc = PatchEncoder("googlenet", pretrained_path=path)  # fc.* unexpected, one missing: logged, not an error
    assert torch.all(enc.backbone.conv1.conv.weight == 0.5)
    with pytest.raises(ConfigError, match="`pretrained_path`"):
        PatchEncoder("googlenet", pretrained_path=tmp_path / "nope.pt")
