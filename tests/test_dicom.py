"""DICOM whole-slide images in (prepare, inference) and DICOM results out (Segmentation, bulk annotations).

The DICOM slides are made here from a TIFF/SVS with ``wsidicomizer`` (the ``test`` extra), re-encoded as lossless
JPEG 2000 so that OpenSlide decodes the DICOM series to exactly the pixels of the source file: the tissue grid and
the heatmap must then be the same.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_wsi_ext.errors import WSIReadError
from monai_wsi_ext.io.dicom import find_wsi_series, resolve_wsi_series
from monai_wsi_ext.io.wsi import open_slide
from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
from monai_wsi_ext.testing.dicom import dicomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
pytest.importorskip("wsidicomizer")


@pytest.fixture(scope="module")
def cmu(shared_data, tmp_path_factory):
    """The real SVS CMU-1-Small-Region (2220 x 2967, mpp 0.499) and the same slide as a DICOM series."""
    svs = shared_data / "slides" / "cmu_small_region.svs"
    return svs, dicomize(svs, tmp_path_factory.mktemp("cmu") / "cmu_dicom")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 1024 x 1024 three-level synthetic pyramidal TIFF (mpp 0.5) and the same slide as a DICOM series."""
    from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide

    root = tmp_path_factory.mktemp("synth")
    generate_slide(root / "tiff" / "s1.tif", seed=3, config=SyntheticSlideConfig(width=1024, height=1024,
                                                                                  patch_size=64, n_lumps=2))
    return root / "tiff" / "s1.tif", dicomize(root / "tiff" / "s1.tif", root / "dicom" / "s1_dicom")


def test_dicom_series_opens_with_openslide_and_the_pixel_spacing_mpp(cmu, synth, tmp_path, caplog):
    svs, folder = cmu
    with caplog.at_level(logging.INFO, logger="monai_wsi_ext.io.wsi"):
        slide = open_slide(folder, backend="cucim")  # cuCIM does not read DICOM: routed to OpenSlide, logged
    assert "DICOM WSI read with OpenSlide" in caplog.text
    series = resolve_wsi_series(folder)
    with slide, open_slide(svs, backend="openslide") as ref:
        assert slide.backend == "openslide" and slide.dicom.series_uid == series.series_uid
        assert slide.dimensions == ref.dimensions == series.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "file" and not slide.warnings
        np.testing.assert_array_equal(slide.read_region(1000, 1500, 300, 200), ref.read_region(1000, 1500, 300, 200))
    # one instance file names the series too; a pyramid keeps its levels
    tif, dfolder = synth
    level0 = resolve_wsi_series(dfolder).level0.path
    with open_slide(level0) as s, open_slide(tif) as t:
        assert s.level_dimensions == t.level_dimensions and len(s.level_dimensions) == 3
        np.testing.assert_array_equal(s.thumbnail(300)[0], t.thumbnail(300)[0])
    # anisotropic Pixel Spacing: (row = y, column = x) in mm; OpenSlide's mpp-x is the column spacing
    aniso = tmp_path / "aniso"
    shutil.copytree(dfolder, aniso)
    for f in aniso.iterdir():
        ds = pydicom.dcmread(f)
        pm = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        pm.PixelSpacing = [f"{float(pm.PixelSpacing[0]) * 1.04:.8g}", pm.PixelSpacing[1]]
        ds.save_as(f)
    with open_slide(aniso) as s:
        assert s.dicom.mpp_xy == pytest.approx((0.5, 0.52))
        assert float(s.handle.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.handle.properties["openslide.mpp-y"]) == pytest.approx(0.52)
        assert s.mpp == pytest.approx(0.51) and not s.warnings


def test_collect_inputs_takes_each_dicom_series_as_one_slide(synth, cmu, tmp_path):
    tif, dfolder = synth
    root = tmp_path / "slides"
    root.mkdir()
    (root / "a.tif").symlink_to(tif)
    shutil.copytree(dfolder, root / "b")  # a series folder: one slide named after it
    flat = root / "two"  # two series in one folder: a slide per series, each its level-0 file
    shutil.copytree(dfolder, flat)
    for f in cmu[1].iterdir():
        shutil.copy(f, flat / f.name)
    (root / "notes").mkdir()
    (root / "notes" / "x.txt").write_text("not DICOM")
    inputs = collect_inputs(slides=root)
    by_id = {i.slide_id: i for i in inputs}
    assert sorted(by_id) == sorted(["a", "b", "two_" + _h(find_wsi_series(dfolder)[0].series_uid),
                                    "two_" + _h(find_wsi_series(cmu[1])[0].series_uid)])
    assert by_id["b"].image == str(root / "b")
    sizes = {}
    for sid, inp in by_id.items():
        if sid.startswith("two_"):
            assert Path(inp.image).parent == flat and Path(inp.image).is_file()
            with open_slide(inp.image) as s:
                sizes[sid] = s.dimensions
    assert sorted(sizes.values()) == [(1024, 1024), (2220, 2967)]
    # the same ids from a list of the paths
    again = collect_inputs(slides=[by_id[k].image for k in sorted(by_id)])
    assert sorted(i.slide_id for i in again) == sorted(by_id)
    with pytest.raises(WSIReadError, match="holds 2 DICOM WSI series"):
        open_slide(flat)
    with pytest.raises(WSIReadError, match="not a file"):
        open_slide(root / "notes")


def _h(uid: str) -> str:
    import hashlib

    return hashlib.sha256(uid.encode()).hexdigest()[:8]


def test_prepare_gives_the_tiff_tissue_grid(cmu, tmp_path):
    """The real SVS and its DICOM series: same tissue mask, same patch grid, same mpp; the DICOM one records its
    UIDs; a second run finds it done (the series' files are its input signature)."""
    svs, folder = cmu
    cfg = PrepareConfig(patch_size=256, backend="cucim")
    inputs = collect_inputs(slides=[svs, folder], negative=True)
    assert [i.slide_id for i in inputs] == ["cmu_small_region", "cmu_dicom"]
    summary = prepare_dataset(inputs, tmp_path, cfg, progress=False)
    assert not summary["failed"]
    metas = {sid: json.loads((tmp_path / sid / "meta.json").read_text()) for sid in ("cmu_small_region", "cmu_dicom")}
    a, b = metas["cmu_small_region"], metas["cmu_dicom"]
    assert b["backend"] == "openslide" and b["mpp"] == a["mpp"] == pytest.approx(0.499)
    for key in ("dimensions", "grid_shape", "counts", "tissue_fraction", "tissue_mask_downsample"):
        assert a[key] == b[key], key
    rows = {sid: [line.split(",", 1)[1] for line in (tmp_path / sid / "patches.csv").read_text().splitlines()]
            for sid in metas}  # every column but the slide id
    assert len(rows["cmu_dicom"]) > 10 and rows["cmu_small_region"] == rows["cmu_dicom"]
    assert (tmp_path / "cmu_small_region" / "tissue_mask.png").read_bytes() == \
        (tmp_path / "cmu_dicom" / "tissue_mask.png").read_bytes()
    series = resolve_wsi_series(folder)
    assert b["dicom"]["series_instance_uid"] == series.series_uid
    assert b["dicom"]["study_instance_uid"] == series.study_uid
    again = prepare_dataset(inputs, tmp_path, cfg, progress=False)
    assert sorted(again["skipped"]) == ["cmu_dicom", "cmu_small_region"] and not again["done"]
    # the datalist names the level-0 instance file, so MONAI's PatchWSIDataset (OpenSlide reader) reads the DICOM
    # slide, with the SVS's pixels; the project's PatchDataset reads the same
    from monai.data import PatchWSIDataset

    from monai_wsi_ext.data.patches import PatchDataset
    from monai_wsi_ext.prep.prepare import datalist_items

    items = {sid: datalist_items(metas[sid], tmp_path)[:3] for sid in metas}
    assert items["cmu_dicom"][0]["image"] == str(series.level0.path)
    monai_dicom = PatchWSIDataset(items["cmu_dicom"], reader="OpenSlide", center_location=False)
    monai_svs = PatchWSIDataset(items["cmu_small_region"], reader="OpenSlide", center_location=False)
    ours = PatchDataset(items["cmu_dicom"])
    for i in range(3):
        a = np.asarray(monai_dicom[i]["image"])
        np.testing.assert_array_equal(a, np.asarray(monai_svs[i]["image"]))
        np.testing.assert_array_equal(a.astype(np.float32) / 255.0, ours[i]["image"].numpy())


@pytest.fixture(scope="module")
def heatmaps(synth, tmp_path_factory):
    """Random-weight small encoder + U-Net run on the TIFF and on its DICOM series, with every DICOM output."""
    from monai_wsi_ext.inference.slides import SlideInference
    from monai_wsi_ext.model.networks import PatchEncoder, make_unet

    root = tmp_path_factory.mktemp("heat")
    torch.manual_seed(0)
    encoder = PatchEncoder(backbone="small_cnn", feature_dim=16)
    unet = make_unet(16, 2, channels=[8, 16], strides=[2])
    torch.save(encoder.state_dict(), root / "encoder.pt")
    torch.save(unet.state_dict(), root / "unet.pt")
    tif, folder = synth
    inference = SlideInference(str(root / "out"), encoder, unet, str(root / "encoder.pt"), str(root / "unet.pt"),
                               slides=[str(tif), str(folder)], prepare={"patch_size": 64}, canvas_size=32,
                               crop_size=56, device="cpu", backend="cucim", threshold=0.5, dicom_seg="both",
                               dicom_annotations=True)
    summary = inference.run()
    return root / "out", summary, folder


def test_dicom_series_gives_the_tiff_heatmap(heatmaps):
    out, summary, _ = heatmaps
    assert sorted(summary["slides"]) == ["s1", "s1_dicom"] and not summary["failed"]
    a, b = np.load(out / "s1" / "s1_prob.npy"), np.load(out / "s1_dicom" / "s1_dicom_prob.npy")
    tissue = ~np.isnan(a)
    assert tissue.sum() > 20 and float(np.nanstd(a)) > 1e-4
    np.testing.assert_array_equal(a, b)  # NaN at the same cells, the same probabilities
    tif_record = json.loads((out / "s1" / "s1_record.json").read_text())
    assert tif_record["dicom_outputs"] == "not written: the slide is not DICOM"
    assert not list((out / "s1").glob("*.dcm"))


def test_dicom_segmentation_reads_back_on_the_slide_geometry(heatmaps):
    out, _, folder = heatmaps
    series = resolve_wsi_series(folder)
    src = pydicom.dcmread(series.level0.path, stop_before_pixels=True)
    prob = np.load(out / "s1_dicom" / "s1_dicom_prob.npy")
    record = json.loads((out / "s1_dicom" / "s1_dicom_record.json").read_text())
    cell = record["cell_size"]
    assert record["outputs"]["dicom_seg_fractional"] == "s1_dicom_seg_fractional.dcm"
    assert record["dicom_source"]["series_instance_uid"] == series.series_uid
    for kind in ("fractional", "binary"):
        seg = hd.seg.segread(out / "s1_dicom" / f"s1_dicom_seg_{kind}.dcm")
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == kind.upper()
        # references: the slide's study, frame of reference, series and level-0 instance
        assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        # geometry: one pixel per grid cell, spacing = cell * the slide's spacing, the slide's orientation, and
        # every cell corner (c, r) of the segmentation at the slide position of level-0 pixel corner (c, r) * cell
        assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == prob.shape
        spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        src_spacing = src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        np.testing.assert_allclose([float(v) for v in spacing], [float(v) * cell for v in src_spacing], rtol=1e-6)
        np.testing.assert_allclose([float(v) for v in seg.ImageOrientationSlide],
                                   [float(v) for v in src.ImageOrientationSlide])
        corners = np.array([[0, 0], [1, 0], [0, 1], [prob.shape[1], prob.shape[0]], [3, 7]], dtype=float)
        on_seg = hd.spatial.ImageToReferenceTransformer.for_image(seg, for_total_pixel_matrix=True)(corners)
        on_slide = hd.spatial.ImageToReferenceTransformer.for_image(src, for_total_pixel_matrix=True)(corners * cell)
        np.testing.assert_allclose(on_seg, on_slide, atol=1e-6)  # mm
        values = seg.get_total_pixel_matrix(segment_numbers=[1])[..., 0]
        if kind == "fractional":
            assert seg.SegmentationFractionalType == "PROBABILITY"
            np.testing.assert_allclose(values, np.round(np.nan_to_num(prob) * 255) / 255, atol=1e-6)
        else:
            np.testing.assert_array_equal(values, np.nan_to_num(prob, nan=-1) >= 0.5)


def test_dicom_bulk_annotations_hold_the_tumor_regions(heatmaps):
    out, _, folder = heatmaps
    series = resolve_wsi_series(folder)
    record = json.loads((out / "s1_dicom" / "s1_dicom_record.json").read_text())
    geo = json.loads((out / "s1_dicom" / "s1_dicom_tumor.geojson").read_text())["features"]
    assert record["n_regions"] == len(geo) >= 1
    ann = hd.ann.annread(out / "s1_dicom" / "s1_dicom_tumor_ann.dcm")
    # 2D coordinates are in the pixel matrix of the referenced image: the level-0 instance
    assert ann.StudyInstanceUID == series.study_uid
    assert ann.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == series.level0.sop_instance_uid
    group = ann.get_annotation_groups()[0]
    polygons = group.get_graphic_data(ann.AnnotationCoordinateType)
    assert group.label == "Tumor regions" and len(polygons) == len(geo)
    # SCOORD: (column, row) with the top left corner of the top left pixel at (0, 0), as the level-0 outputs
    exterior = np.asarray(geo[0]["geometry"]["coordinates"][0][:-1], dtype=np.float32)
    np.testing.assert_allclose(polygons[0], exterior, atol=1e-3)
    names, values, _ = group.get_measurements()
    means = values[:, [n.meaning for n in names].index("Probability")]
    np.testing.assert_allclose(means, [r["mean_probability"] for r in record["regions"]], rtol=1e-6)


def test_dicom_input_without_the_extra_names_it(synth, monkeypatch):
    """Without pydicom a DICOM folder is still listed as one slide, and opening it fails naming the extra."""
    import sys

    _, folder = synth
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    inputs = collect_inputs(slides=[folder])
    assert [(i.image, i.slide_id) for i in inputs] == [(str(folder), "s1_dicom")]
    with pytest.raises(WSIReadError, match=r"the `dicom` extra: pip install -e \"\.\[dicom\]\""):
        open_slide(folder)


def test_dicom_output_options_and_bad_input(synth, tmp_path):
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.outputs.dicom import write_dicom_annotations, write_dicom_seg
    from monai_wsi_ext.outputs.handlers import dicom_seg_types

    assert dicom_seg_types(None) == dicom_seg_types("off") == ()
    assert dicom_seg_types("both") == ("fractional", "binary") == dicom_seg_types(["fractional", "binary", "both"])
    assert dicom_seg_types("Binary") == ("binary",)
    with pytest.raises(ConfigError, match="dicom_seg"):
        dicom_seg_types("labelmap")
    series = resolve_wsi_series(synth[1])
    with pytest.raises(ValueError, match="probabilities in"):
        write_dicom_seg(tmp_path / "x.dcm", np.full((4, 4), 2.0), 64, series)
    with pytest.raises(ValueError, match="segmentation_type"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros((4, 4)), 64, series, "labelmap")
    with pytest.raises(ValueError, match="no tumor regions"):
        write_dicom_annotations(tmp_path / "a.dcm", [], series)
    assert not list(tmp_path.iterdir())  # nothing half-written
