"""Vahadane stain normalisation stored with the encoder (issue 13 item 5): the target fitted on a real H&E patch, a
restained copy brought back towards the original, per-patch determinism, and the target surviving checkpoints, the
ONNX export (run in torch before the graph) and the config's fit step. Needs the ``stain`` extra (in ``test``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.model.networks import PatchEncoder
from monai_wsi_ext.model.normalization import (META_STAIN_NORM, ReinhardNormalization, VahadaneNormalization,
                                               fit_encoder_normalization, fit_reinhard_target, fit_vahadane_target)

pytest.importorskip("torch_staintools")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def crc(shared_data) -> dict[str, Path]:
    files = sorted((shared_data / "patches" / "crc").glob("*.png"))
    return {"tum": next(f for f in files if f.name.startswith("TUM-")),
            "str": next(f for f in files if f.name.startswith("STR-")),
            "norm": next(f for f in files if f.name.startswith("NORM-"))}


@pytest.fixture(scope="module")
def target(crc):
    return fit_vahadane_target(crc["tum"])


def _restain(x: torch.Tensor, gains=(1.35, 0.75, 1.15)) -> torch.Tensor:
    """Beer-Lambert restaining: each channel's optical density scaled (a different stain colour and strength)."""
    od = -torch.log(x.clamp(min=1 / 255))
    return torch.exp(-od * torch.tensor(gains).view(1, 3, 1, 1)).clamp(0, 1)


def test_target_is_an_h_and_e_stain_matrix(target):
    matrix, conc = np.asarray(target[0]), np.asarray(target[1])
    assert matrix.shape == (2, 3) and conc.shape == (2,)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)  # unit optical-density vectors
    assert (matrix >= 0).all() and (conc > 0).all()
    assert matrix[0, 0] > matrix[1, 0]  # haematoxylin absorbs red more than eosin does


def test_restained_patch_moves_back_to_the_reference(crc, target):
    norm = VahadaneNormalization(True)
    norm.set_target(*target)
    ref = _image(crc["tum"])
    restained = _restain(ref)
    with torch.no_grad():
        back, same = norm(restained), norm(ref)
    before = float((restained - ref).abs().mean())
    assert before > 0.05
    assert float((back - ref).abs().mean()) < 0.5 * before
    assert float((same - ref).abs().mean()) < 0.02  # the reference itself is nearly unchanged
    assert back.shape == ref.shape and back.dtype == torch.float32 and not back.requires_grad


def test_each_patch_on_its_own_and_blank_patches_pass(crc, target):
    norm = VahadaneNormalization(True, estimate_stride=8)
    norm.set_target(*target)
    x = torch.cat([_image(crc["str"]), _image(crc["norm"]), torch.ones(1, 3, 224, 224)])
    with torch.no_grad():
        batch = norm(x)
        alone = torch.cat([norm(x[i:i + 1]) for i in range(3)])
        again = norm(x)
    assert torch.equal(batch, alone) and torch.equal(batch, again)
    assert torch.equal(batch[2], x[2])  # no tissue: unchanged
    assert float((batch[0] - x[0]).abs().mean()) > 0.01  # a tissue patch is changed


def test_target_travels_with_checkpoint_and_onnx(crc, target, tmp_path):
    pytest.importorskip("onnxruntime")
    from monai_wsi_ext.runtime import RuntimeNetwork
    from monai_wsi_ext.runtime.onnx import export_onnx, read_onnx_metadata

    torch.manual_seed(0)
    enc = PatchEncoder("small_cnn", input_stain_norm="vahadane").eval()
    enc.stain_norm.estimate_stride = 8
    enc.stain_norm.set_target(*target)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    x = torch.cat([_image(crc["str"]), _image(crc["norm"])])[..., :96, :96]
    with torch.no_grad():
        want_f, want_logits = enc.features(x), enc(x)
    # a default-config encoder takes the checkpoint's stain method (strict load), and back again for Reinhard
    plain = PatchEncoder("small_cnn").eval()
    plain.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True), strict=True)
    assert isinstance(plain.stain_norm, VahadaneNormalization) and plain.stain_norm.active
    plain.stain_norm.estimate_stride = 8
    with torch.no_grad():
        assert torch.equal(plain.features(x), want_f)
    reinhard = PatchEncoder("small_cnn", input_stain_norm="reinhard")
    reinhard.stain_norm.set_target(*fit_reinhard_target(crc["tum"]))
    swapped = PatchEncoder("small_cnn", input_stain_norm="vahadane")
    swapped.load_state_dict(reinhard.state_dict(), strict=True)
    assert isinstance(swapped.stain_norm, ReinhardNormalization) and swapped.stain_norm.active
    # ONNX: the graph starts after the stain step, whose target is in the metadata; the runtime runs it in torch
    export_onnx(enc, "encoder", tmp_path / "encoder.onnx", example=x)
    meta = read_onnx_metadata(tmp_path / "encoder.onnx")
    assert META_STAIN_NORM in meta
    net = RuntimeNetwork(None, "encoder", "onnxruntime", "fp32", tmp_path / "encoder.onnx")
    f, logits = net.features_and_logits(x)
    assert float((f - want_f).abs().max()) < 1e-5 and float((logits - want_logits).abs().max()) < 1e-5
    graph_only = net.session(x)(x)[0]  # without the torch step the features differ: the step is not in the graph
    assert float((graph_only - want_f).abs().max()) > 1e-3


def test_fit_step_and_clear_errors(crc, target, monkeypatch):
    enc = PatchEncoder("small_cnn", input_stain_norm="vahadane")
    assert enc.stain_norm.active and not enc.stain_norm.fitted
    with pytest.raises(ConfigError, match="stain_reference"):
        fit_encoder_normalization(enc, None)
    fit_encoder_normalization(enc, None, stain_reference=crc["tum"])
    assert enc.stain_norm.fitted
    assert np.allclose(enc.stain_norm.stain_matrix.numpy(), target[0], atol=1e-6)
    with pytest.raises(ConfigError, match="too little tissue"):
        fit_vahadane_target(np.full((64, 64, 3), 255, np.uint8))
    with pytest.raises(ConfigError, match="2 x 3"):
        VahadaneNormalization(True).set_target([[1.0, 0.0, 0.0]], [1.0, 1.0])
    # without the package: a clear message naming the extra, at construction
    monkeypatch.setitem(sys.modules, "torch_staintools", None)
    for name in [m for m in sys.modules if m.startswith("torch_staintools.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"monai-wsi-canvas\[stain\]"):
        PatchEncoder("small_cnn", input_stain_norm="vahadane")


def test_bundle_export_paths(crc, target, tmp_path):
    """``export_onnx_network`` (the default format) exports the checkpoint with its target in the metadata and
    ``load_exported`` (the Deploy application's loader) applies it; the legacy TorchScript export refuses clearly."""
    pytest.importorskip("onnxruntime")
    from monai_wsi_ext.export.bundle import export_network, export_onnx_network, load_exported

    bundle = Path(__file__).resolve().parents[1] / "bundle"
    torch.manual_seed(0)
    enc = PatchEncoder("small_cnn", input_stain_norm="vahadane").eval()
    enc.stain_norm.set_target(*target)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    over = {"backbone": "small_cnn", "patch_size": 64, "crop_size": 64}  # the checkpoint says Vahadane
    out = export_onnx_network("encoder", tmp_path / "encoder.pt", tmp_path / "encoder.onnx", bundle_root=bundle,
                              **over)
    net, settings = load_exported(out, runtime="onnxruntime")
    assert settings["crop_size"] == 64
    x = _image(crc["str"])[..., :64, :64]
    with torch.no_grad():
        assert float((net.features(x) - enc.features(x)).abs().max()) < 1e-5
    with pytest.raises(ConfigError, match="TorchScript"):
        export_network("encoder", tmp_path / "encoder.pt", tmp_path / "encoder.ts", bundle_root=bundle, **over)
    assert not (tmp_path / "encoder.ts").exists()


def test_bench_stain_norm_quick(tmp_path):
    """Smoke run of ``scripts/bench_stain_norm.py run --quick``: every step is timed against the encoder and
    Vahadane's seed spread is reported; ``--write_md`` writes its section (it says nothing about speed)."""
    import json
    import math
    import subprocess

    root = Path(__file__).resolve().parents[1]
    md, out = tmp_path / "B.md", tmp_path / "r.json"
    args = [sys.executable, str(root / "scripts" / "bench_stain_norm.py"), "run", "--quick", "--write_md", str(md),
            "--output_json", str(out)]
    proc = subprocess.run(args, cwd=str(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["quick"] and res["n_patches"] == 2
    rows = res["seconds_per_patch"]
    assert len(rows) == 4 and all(math.isfinite(v) and v > 0 for v in rows.values())
    ref = "GoogLeNet encoder (eager, channels_last, batch 16)"
    assert res["ratio_to_encoder"][ref] == 1.0
    assert all(math.isclose(res["ratio_to_encoder"][k], v / rows[ref]) for k, v in rows.items())
    assert set(res["vahadane_seed_spread"]) == {"8"}
    text = md.read_text()
    assert "## Stain normalisation cost (CPU)" in text and "Quick smoke run" in text and "| Vahadane, stride 8" in text
