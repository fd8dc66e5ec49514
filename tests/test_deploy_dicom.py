"""The Deploy application's DICOM path: which series of an input folder are slides, the MAP application folder,
and (with the MONAI Deploy App SDK, ``make test-deploy``) the application run on a DICOM study as a MAP runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.deploy.inputs import input_slides
from monai_wsi_ext.deploy.package import build_map_app, named_model_folder, requirements
from monai_wsi_ext.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
pytest.importorskip("wsidicomizer")

REPO = Path(__file__).resolve().parents[1]
HAS_DEPLOY = importlib.util.find_spec("monai.deploy") is not None
SETTINGS = {"patch_size": 64, "crop_size": 56, "canvas_size": 32}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A DICOM study folder as an archive sends it: a 1024 x 1024 slide and a 768 x 512 slide, each a series in its
    own sub-folder (nested one level deeper), a Segmentation of an earlier run (not a slide), and a TIFF."""
    from monai_wsi_ext.io.dicom import resolve_wsi_series
    from monai_wsi_ext.outputs.dicom import write_dicom_seg
    from monai_wsi_ext.testing.dicom import dicomize
    from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide

    root = tmp_path_factory.mktemp("study")
    src = root / "src"
    generate_slide(src / "big.tif", seed=4, config=SyntheticSlideConfig(width=1024, height=1024, patch_size=64,
                                                                         n_lumps=2))
    generate_slide(src / "small.tif", seed=5, config=SyntheticSlideConfig(width=768, height=512, patch_size=64,
                                                                           n_lumps=1))
    inp = root / "input"
    big = dicomize(src / "big.tif", inp / "study1" / "series_big")
    small = dicomize(src / "small.tif", inp / "study1" / "series_small")
    write_dicom_seg(inp / "study1" / "old_seg.dcm", np.full((8, 8), 0.5, np.float32), 128.0,
                    resolve_wsi_series(big))
    tif = inp / "other.tif"
    shutil.copy(src / "small.tif", tif)
    return {"root": root, "input": inp, "big": big, "small": small, "tif": tif}


def test_input_slides_takes_the_largest_wsi_series_and_every_file(study, tmp_path):
    inp = study["input"]
    assert input_slides(inp) == [str(study["tif"]), str(study["big"])]
    assert input_slides(inp, "all") == [str(study["tif"]), str(study["big"]), str(study["small"])]
    # only DICOM, both series in one folder: each given as its level-0 instance file
    flat = tmp_path / "flat"
    for d in (study["big"], study["small"]):
        shutil.copytree(d, flat, dirs_exist_ok=True)
    (got,) = input_slides(flat)
    ds = pydicom.dcmread(got, stop_before_pixels=True)
    assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (1024, 1024) and "VOLUME" in ds.ImageType
    assert len(input_slides(flat, "all")) == 2
    with pytest.raises(ConfigError, match="dicom_series"):
        input_slides(inp, "first")
    only_seg = tmp_path / "seg_only"
    only_seg.mkdir()
    shutil.copy(inp / "study1" / "old_seg.dcm", only_seg / "old_seg.dcm")
    with pytest.raises(ConfigError, match="no slides found"):
        input_slides(only_seg)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small random-weight encoder (small_cnn) and the bundle's U-Net exported with the demo's tiling."""
    from monai_wsi_ext.export.bundle import export_network
    from monai_wsi_ext.model.networks import PatchEncoder, bundle_unet

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    torch.save(PatchEncoder(backbone="small_cnn", feature_dim=16).state_dict(), root / "encoder.pt")
    torch.save(bundle_unet([REPO / "bundle" / "configs" / "common.json"]).state_dict(), root / "unet.pt")
    for name in ("encoder", "unet"):
        export_network(name, root / f"{name}.pt", root / "export" / f"{name}.ts", bundle_root=REPO / "bundle",
                       backbone="small_cnn", **SETTINGS)
    return root / "export"


def test_map_application_folder_and_named_models(models, tmp_path):
    import tomllib

    import yaml

    app = build_map_app(tmp_path / "app")
    assert {p.name for p in app.iterdir()} == {"__main__.py", "app.yaml", "requirements.txt", "monai_wsi_ext"}
    manifest = yaml.safe_load((app / "app.yaml").read_text())
    assert manifest["application"]["inputFormats"] == ["file"] and manifest["application"]["version"]
    assert {"cpu", "memory"} <= set(manifest["resources"])
    lines = [line for line in (app / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in [*project["dependencies"], *project["optional-dependencies"]["dicom"],
                *project["optional-dependencies"]["deploy"], *project["optional-dependencies"]["stain"]]:
        assert req in lines, req
    assert lines == requirements() and len(lines) == len({line.split("=")[0].split(">")[0] for line in lines})
    assert (app / "monai_wsi_ext" / "io" / "dicom.py").is_file() and not list(app.rglob("__pycache__"))
    with pytest.raises(ConfigError, match="exists"):
        build_map_app(tmp_path / "app")
    # the named-model layout reads back as the same pair of models
    from monai_wsi_ext.deploy.models import find_model_files, load_exported_models

    named = named_model_folder(models, tmp_path / "models")
    assert {k: (v.parent.name, v.name) for k, v in named.items()} == {"encoder": ("encoder", "encoder.ts"),
                                                                      "unet": ("unet", "unet.ts")}
    assert find_model_files(tmp_path / "models") == named
    loaded = load_exported_models(tmp_path / "models")
    assert {k: loaded.settings[k] for k in SETTINGS} == SETTINGS and loaded.settings["backbone"] == "small_cnn"


def test_exported_models_on_a_dicom_series(study, models, tmp_path):
    """The exported-model path without MONAI Deploy: the selected series through ``run_exported_inference``, with
    the backend set to cuCIM (DICOM goes to OpenSlide), gives the map and its Segmentation."""
    from monai_wsi_ext.deploy.models import load_exported_models, run_exported_inference

    slides = input_slides(study["input"])[1:]  # the DICOM slide only
    summary = run_exported_inference(slides, tmp_path, load_exported_models(models), device="cpu", backend="cucim",
                                     dicom_seg="fractional")
    assert list(summary["slides"]) == ["series_big"] and not summary["failed"]
    prob = np.load(tmp_path / "series_big" / "series_big_prob.npy")
    assert (~np.isnan(prob)).sum() > 20
    seg = hd.seg.segread(tmp_path / "series_big" / "series_big_seg_fractional.dcm")
    np.testing.assert_allclose(seg.get_total_pixel_matrix(segment_numbers=[1])[..., 0],
                               np.round(np.nan_to_num(prob) * 255) / 255, atol=1e-6)
    assert not (tmp_path / "series_big" / "series_big_seg_binary.dcm").exists()


@pytest.mark.skipif(not HAS_DEPLOY and not os.environ.get("REQUIRE_MONAI_DEPLOY"),
                    reason="MONAI Deploy App SDK not installed (`make test-deploy` runs this test)")
def test_map_application_runs_on_a_dicom_study(study, models, tmp_path):
    """The assembled MAP app folder run as the MAP runs it (``python <app folder> -i -o -m``, named models) on
    the study: the largest WSI series and the TIFF get heatmaps; the DICOM slide also a Segmentation (fractional and
    binary) and bulk annotations that reference it."""
    assert HAS_DEPLOY, "REQUIRE_MONAI_DEPLOY is set but monai.deploy does not import"
    from monai_wsi_ext.io.dicom import resolve_wsi_series

    app = build_map_app(tmp_path / "app")
    named_model_folder(models, tmp_path / "models")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WSI_CANVAS_DEVICE": "cpu", "WSI_CANVAS_DICOM_SEG": "both",
           "WSI_CANVAS_BACKEND": "cucim"}
    run = subprocess.run([sys.executable, str(app), "-i", str(study["input"]), "-o", str(tmp_path / "out"), "-m",
                          str(tmp_path / "models")], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "inference_summary.json").read_text())
    assert sorted(summary["slides"]) == ["other", "series_big"] and not summary["failed"]
    out = tmp_path / "out" / "series_big"
    prob = np.load(out / "series_big_prob.npy")
    series = resolve_wsi_series(study["big"])
    for kind in ("fractional", "binary"):
        seg = hd.seg.segread(out / f"series_big_seg_{kind}.dcm")
        assert seg.StudyInstanceUID == series.study_uid and seg.FrameOfReferenceUID == series.frame_of_reference_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
        assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == prob.shape
    fractional = hd.seg.segread(out / "series_big_seg_fractional.dcm").get_total_pixel_matrix(segment_numbers=[1])
    np.testing.assert_allclose(fractional[..., 0], np.round(np.nan_to_num(prob) * 255) / 255, atol=1e-6)
    record = json.loads((out / "series_big_record.json").read_text())
    assert (out / "series_big_tumor_ann.dcm").is_file() == (record["n_regions"] > 0)
    assert not list((tmp_path / "out" / "other").glob("*.dcm"))  # the TIFF: files only
