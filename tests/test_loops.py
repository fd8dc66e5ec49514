"""One per-slide loop (issue 9): feature extraction and the segmentation-only baseline run on the
:class:`~monai_wsi_ext.engines.evaluators.SlideEvaluator` with declared components (dataset, inferer, writer and
summary handlers), and write what the loops they replace wrote.

The old-vs-new checks run the previous implementations (``FeatureExtractor.run`` and ``SegmentationPredictor.run``
with their own loops, as of :data:`OLD_COMMIT`) from git against the new configs and facades on the session's
prepared synthetic dataset; they are skipped where git or that commit is not available.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")

#: the last commit with the hand-written per-slide loops of feature extraction and the segmentation baseline
OLD_COMMIT = "26f2f143cef55e06e53a16a9c205066a974e184d"

CROP = 32  # a small eval crop keeps the encoder fast on 2 CPU cores
FEATURE_DIM = 8
SEG_CHANNELS = (4, 8, 16, 32)


def _old_module(path: str, name: str) -> types.ModuleType:
    """``path`` as it was at :data:`OLD_COMMIT`, imported against today's package."""
    try:
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:{path}"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"the previous {path} is not available from git ({OLD_COMMIT[:8]})")
    module = types.ModuleType(name)
    module.__file__ = f"{OLD_COMMIT[:8]}:{path}"
    sys.modules[name] = module
    try:
        exec(compile(src, module.__file__, "exec"), module.__dict__)
    except ImportError as e:  # the package moved on since: nothing to compare against
        pytest.skip(f"the previous {path} does not import against today's package ({e})")
    finally:
        sys.modules.pop(name, None)
    return module


def _workflow(configs: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON] + [str(CONFIGS / c) for c in configs], workflow_type=None,
                        **overrides)
    wf.initialize()
    return wf


def _encoder(seed: int = 0) -> torch.nn.Module:
    from monai_wsi_ext.model.networks import PatchEncoder

    torch.manual_seed(seed)
    return PatchEncoder(backbone="googlenet", feature_dim=FEATURE_DIM, num_classes=2)


def _seg_unet(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=SEG_CHANNELS, strides=(2, 2, 2),
                num_res_units=2)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    torch.save(_encoder(1).state_dict(), path)
    return path


def _npz_members(path: Path) -> dict[str, bytes]:
    """The ``.npy`` members of a feature file, byte for byte (the zip's own timestamps left out)."""
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def _assert_same_feature_files(old_dir: Path, new_dir: Path) -> None:
    old_files = sorted(p.name for p in old_dir.glob("*.npz"))
    assert old_files and old_files == sorted(p.name for p in new_dir.glob("*.npz"))
    for name in old_files:
        with np.load(old_dir / name) as a, np.load(new_dir / name) as b:
            assert a.files == b.files, name  # same keys, same order
            for key in a.files:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (name, key)
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
        assert _npz_members(old_dir / name) == _npz_members(new_dir / name), name


def test_feature_files_match_the_previous_extractor(prepared_dataset, encoder_ckpt, tmp_path):
    from monai_wsi_ext.inference.features import FeatureExtractor

    torch.set_num_threads(2)
    prepared, _ = prepared_dataset
    old = _old_module("monai_wsi_ext/inference/features.py", "_old_features")
    args = dict(checkpoint=str(encoder_ckpt), device="cpu", batch_size=32, crop_size=CROP, num_workers=0,
                splits=["training"])
    old_summary = old.FeatureExtractor(str(prepared), str(tmp_path / "old"), _encoder(), **args).run()
    new_summary = FeatureExtractor(str(prepared), str(tmp_path / "new"), _encoder(), **args).run()
    assert len(old_summary["done"]) == 2 and not old_summary["failed"]
    assert {k: v for k, v in new_summary.items() if k != "output_dir"} == \
        {k: v for k, v in old_summary.items() if k != "output_dir"}
    _assert_same_feature_files(tmp_path / "old", tmp_path / "new")
    # the bundle config (dataset, CanvasInferer, FeatureWriter, FeatureSummary on the SlideEvaluator) alike
    wf = _workflow(["extract_features.json"], dataset_dir=str(prepared), output_dir=str(tmp_path / "cfg"),
                   encoder_ckpt=str(encoder_ckpt), feature_dim=FEATURE_DIM, crop_size=CROP, batch_size=32,
                   num_workers=0, split=["training"], device="$torch.device('cpu')")
    wf.run()
    _assert_same_feature_files(tmp_path / "old", tmp_path / "cfg" / "features")
    summary = json.loads((tmp_path / "cfg" / "features" / "features_summary.json").read_text())
    assert summary["done"] == old_summary["done"] and summary["skipped"] == [] and summary["failed"] == {}
    # the previous version's files are up to date for the new extractor (same cache key): nothing is recomputed
    again = FeatureExtractor(str(prepared), str(tmp_path / "old"), _encoder(), **args).run()
    assert again["done"] == [] and again["skipped"] == old_summary["done"]


def test_feature_extraction_skips_unchanged_slides(prepared_dataset, tmp_path, monkeypatch):
    """Up-to-date feature files are not recomputed (the evaluator does not even encode the slide); another
    transform, other weights, an unreadable file or ``overwrite`` recompute; stale temporary files are removed."""
    from monai_wsi_ext.inference.features import FeatureExtractor
    from monai_wsi_ext.model import predict as P

    prepared, _ = prepared_dataset
    encoded: list[str] = []

    def encode(encoder, source, *a, **k):  # the caching is under test, not the encoder: no patch is read
        encoded.append(Path(source.image).stem)
        n = len(source)
        return np.zeros((n, 4), np.float32), np.full(n, 0.5, np.float32)

    monkeypatch.setattr(P, "encode_slide", encode)

    def run(seed: int = 0, **kwargs) -> dict:
        torch.manual_seed(seed)
        args = dict(device="cpu", crop_size=CROP, num_workers=0, splits=["training"], channels_last=False)
        return FeatureExtractor(str(prepared), str(out), torch.nn.Linear(3, 4), **{**args, **kwargs}).run()

    out = tmp_path / "feat"
    first = run()
    assert len(first["done"]) == 2 and len(encoded) == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    stale = out / f".{first['done'][0]}.npz.k2j4x9_a.npz"  # a temporary file left by a killed run
    stale.write_bytes(b"PK\x03\x04 truncated")
    second = run()
    assert second["done"] == [] and second["skipped"] == first["done"] and len(encoded) == 2  # not re-encoded
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == mtimes and not stale.exists()
    assert json.loads((out / "features_summary.json").read_text())["skipped"] == first["done"]
    assert run(crop_size=48)["done"] == first["done"]  # another transform
    assert run(1, crop_size=48)["done"] == first["done"]  # other weights
    (out / f"{first['done'][1]}.npz").write_bytes(b"not a zip")
    redo = run(1, crop_size=48)
    assert redo["done"] == [first["done"][1]] and redo["skipped"] == [first["done"][0]]
    assert run(1, crop_size=48, overwrite=True)["done"] == first["done"]
    assert len(encoded) == 2 + 2 + 2 + 1 + 2


def test_feature_extraction_failing_slide_exits_non_zero(prepared_dataset, encoder_ckpt, tmp_path):
    """One slide cannot be read: the others get their feature files, the summary names it, the run exits 1."""
    prepared, _ = prepared_dataset
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    broken = sorted(copy.glob("*/meta.json"))[0]
    meta = json.loads(broken.read_text())
    meta["image"] = str(tmp_path / "gone.tif")
    broken.write_text(json.dumps(meta))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           f"['{COMMON}','{CONFIGS / 'extract_features.json'}']", "--dataset_dir", str(copy), "--output_dir",
           str(out), "--encoder_ckpt", str(encoder_ckpt), "--feature_dim", str(FEATURE_DIM), "--crop_size", str(CROP),
           "--num_workers", "0", "--split", "['training']"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    summary = json.loads((out / "features" / "features_summary.json").read_text())
    assert list(summary["failed"]) == [meta["slide_id"]] and "gone.tif" in summary["failed"][meta["slide_id"]]
    assert len(summary["done"]) == 1 and meta["slide_id"] not in summary["done"]
    assert sorted(p.stem for p in (out / "features").glob("*.npz")) == sorted(summary["done"])
    assert "feature extraction failed" in res.stderr and "Traceback" not in res.stderr


def _assert_same_heatmaps(old_dir: Path, new_dir: Path) -> None:
    import tifffile

    old_sum = json.loads((old_dir / "inference_summary.json").read_text())
    new_sum = json.loads((new_dir / "inference_summary.json").read_text())
    assert new_sum["mode"] == old_sum["mode"] == "segmentation" and new_sum["failed"] == old_sum["failed"] == {}
    assert list(new_sum["slides"]) == list(old_sum["slides"]) and old_sum["slides"]
    for sid, rec in old_sum["slides"].items():
        for key in ("slide_score", "status", "n_patches"):
            assert new_sum["slides"][sid][key] == rec[key], (sid, key)
        a, b = old_dir / sid, new_dir / sid
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir()), sid
        for name in names:
            if name.endswith(".tif"):  # same pyramid, pixel for pixel
                with tifffile.TiffFile(a / name) as ta, tifffile.TiffFile(b / name) as tb:
                    assert len(ta.pages) == len(tb.pages)
                    for pa, pb in zip(ta.pages, tb.pages):
                        np.testing.assert_array_equal(pa.asarray(), pb.asarray(), err_msg=name)
            elif name.endswith("_record.json"):  # the same record but for when and how it was run
                ra, rb = (json.loads((d / name).read_text()) for d in (a, b))
                for rec in (ra, rb):
                    for key in ("timestamp_utc", "command"):
                        rec.pop(key)
                assert ra == rb, name
                assert ra["slide_score"] is not None and ra["weights"], name
            else:  # .npy maps and labels, PNG map and overlay, GeoJSON regions: byte for byte
                assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_segmentation_heatmaps_match_the_previous_predictor(prepared_dataset, tmp_path):
    from monai_wsi_ext.baselines.segmentation import SegmentationPredictor

    torch.set_num_threads(2)
    prepared, _ = prepared_dataset
    ckpt = tmp_path / "seg_unet.pt"
    torch.save({"model": _seg_unet(2).state_dict()}, ckpt)
    old = _old_module("monai_wsi_ext/baselines/segmentation.py", "_old_segmentation")
    args = dict(checkpoint=str(ckpt), split="training", downsample=8, roi_size=64, device="cpu")
    old.SegmentationPredictor(str(prepared), str(tmp_path / "old"), _seg_unet(), **args).run()
    summary = SegmentationPredictor(str(prepared), str(tmp_path / "new"), _seg_unet(), **args).run()
    assert len(summary["slides"]) == 2
    _assert_same_heatmaps(tmp_path / "old", tmp_path / "new")
    # the bundle config: predict-only overlay (SlideDataset, SegmentationInferer, HeatmapWriter, InferenceSummary)
    wf = _workflow(["baseline_segmentation.json", "baseline_segmentation_predict.json"], dataset_dir=str(prepared),
                   output_dir=str(tmp_path / "cfg"), seg_ckpt=str(ckpt), seg_channels=list(SEG_CHANNELS),
                   seg_crop_size=64, split="training", device="$torch.device('cpu')")
    wf.run()
    _assert_same_heatmaps(tmp_path / "old", tmp_path / "cfg" / "heatmaps_segmentation")


def test_segmentation_checkpoint_and_failing_slide(prepared_dataset, tmp_path):
    from monai_wsi_ext.baselines.segmentation import SegmentationPredictor
    from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError

    prepared, _ = prepared_dataset
    bad = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bad)
    with pytest.raises(ConfigError, match="`seg_ckpt`"):
        SegmentationPredictor(str(prepared), str(tmp_path / "x"), _seg_unet(), checkpoint=str(bad), split=None,
                              device="cpu", roi_size=64).run()
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    broken = sorted(copy.glob("*/meta.json"))[-1]
    meta = json.loads(broken.read_text())
    meta["image"] = str(tmp_path / "gone.tif")
    broken.write_text(json.dumps(meta))
    out = tmp_path / "heat"
    with pytest.raises(MonaiWsiExtError, match="1 slide"):
        SegmentationPredictor(str(copy), str(out), _seg_unet(), split=None, device="cpu", roi_size=64).run()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert list(summary["failed"]) == [meta["slide_id"]] and len(summary["slides"]) == 2
    assert not (out / meta["slide_id"]).exists()


def test_configs_run_the_slide_evaluator():
    """Each config's ``run`` is the evaluator; its components are declared (a user swaps one by editing JSON)."""
    from monai.bundle import ConfigParser

    from monai_wsi_ext.baselines.segmentation import SegmentationInferer
    from monai_wsi_ext.engines.handlers import StrictCheckpointLoader
    from monai_wsi_ext.model.predict import CanvasInferer
    from monai_wsi_ext.outputs.handlers import FeatureSummary, FeatureWriter, HeatmapWriter, InferenceSummary

    expected = {
        ("extract_features.json",): ("evaluator", CanvasInferer, [StrictCheckpointLoader, FeatureWriter,
                                                                  FeatureSummary]),
        ("baseline_segmentation.json", "baseline_segmentation_predict.json"):
            ("predict#evaluator", SegmentationInferer, [StrictCheckpointLoader, HeatmapWriter, InferenceSummary]),
    }
    for configs, (evaluator, inferer, handlers) in expected.items():
        parser = ConfigParser()
        parser.read_config([COMMON] + [str(CONFIGS / c) for c in configs])
        assert parser["run"][-1] == f"$@{evaluator}.run()"
        assert parser["initialize"][0] == "$monai_wsi_ext.config_check.check_cli_overrides()"
        prefix = evaluator.rsplit("#", 1)[0] + "#" if "#" in evaluator else ""
        assert parser[f"{evaluator}#_target_"].endswith("SlideEvaluator")
        assert parser[f"{prefix}dataset#_target_"] == "monai_wsi_ext.inference.slides.SlideDataset"
        assert isinstance(parser.get_parsed_content(f"{prefix}inferer"), inferer)
        got = [parser.get_parsed_content(f"{prefix}handlers#{i}") for i in range(len(handlers))]
        assert [type(h) for h in got] == handlers


@pytest.mark.parametrize("path, cls", [("monai_wsi_ext/inference/features.py", "FeatureExtractor"),
                                       ("monai_wsi_ext/baselines/segmentation.py", "SegmentationPredictor")])
def test_facades_have_no_loop_of_their_own(path, cls):
    """The facades build the config's components and call ``SlideEvaluator.run``: no second per-slide loop."""
    tree = ast.parse((REPO / path).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    assert not [n for n in ast.walk(node) if isinstance(n, (ast.For, ast.While, ast.comprehension))]
    assert "SlideEvaluator" in ast.unparse(node)
