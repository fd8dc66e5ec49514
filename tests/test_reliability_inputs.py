"""Reliability against bad inputs (issue 8, items 7-10): bounded slide reads and a per-slide time limit, annotations
that match nothing, slides without what the result needs (no tissue, no mpp, no label, pen marks, symlink loops),
and cuCIM's CPU-run noise. Each test fails on the code before these fixes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from monai_wsi_ext.errors import AnnotationError, ConfigError, WSIReadError

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def _forged_strip_tiff(path: Path, side: int = 150000) -> Path:
    """A ~300-byte TIFF whose header declares ``side`` x ``side`` RGB pixels in one deflate strip of 15 bytes."""
    import tifffile

    tifffile.imwrite(path, np.full((16, 16, 3), 200, np.uint8), photometric="rgb", compression="zlib",
                     rowsperstrip=16)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(side)
        tags["ImageLength"].overwrite(side)
        tags["RowsPerStrip"].overwrite(side)
    return path


def _forged_tiled_tiff(path: Path, side: int = 20000) -> Path:
    """A tiled TIFF whose header declares ``side`` x ``side`` px (1600 tiles of 512) but lists one tile."""
    import tifffile

    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), photometric="rgb", compression="zlib",
                     tile=(512, 512))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(side)
        tags["ImageLength"].overwrite(side)
    return path


def _flat_tiff(path: Path, image: np.ndarray) -> Path:
    import tifffile

    tifffile.imwrite(path, image, photometric="rgb", compression="zlib", rowsperstrip=64)
    return path


def _strokes(shape, width: int = 12):
    """Three pen strokes (blue diagonal, green anti-diagonal, black horizontal) as bool masks and colours."""
    from skimage.draw import line

    h, w = shape
    out = []
    for (r0, c0, r1, c1), colour in [((10, 10, h - 10, w - 30), (35, 60, 165)),
                                     ((h - 20, 10, 20, w - 10), (40, 140, 70)),
                                     ((h // 2, 5, h // 2, w - 5), (25, 25, 30))]:
        m = np.zeros((h, w), bool)
        rr, cc = line(r0, c0, r1, c1)
        for d in range(-(width // 2), width - width // 2):
            m[np.clip(rr + d, 0, h - 1), cc] = True
            m[rr, np.clip(cc + d, 0, w - 1)] = True
        out.append((m, colour))
    return out


def _square(x0, y0, side, label="tumor"):
    from monai_wsi_ext.io.annotations import AnnotationPolygon

    ring = np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)
    return AnnotationPolygon(ring, label=label)


def _geojson(path: Path, features: list[tuple[str, list]]) -> Path:
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
              "properties": {"classification": {"name": cls}}} for cls, ring in features]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


# ================================================================================================= 7. bounded reads
@pytest.mark.parametrize("make,reason", [
    (_forged_strip_tiff, "cannot be what the header says"),
    (_forged_tiled_tiff, "lists only 1"),
], ids=["150000px_in_15_bytes", "1600_tiles_listed_as_1"])
def test_forged_header_is_refused_before_any_read(tmp_path, make, reason):
    """A 1 KB TIFF declaring 150000 x 150000 px made cuCIM open it and the thumbnail allocate 3.4 GB (OpenSlide's
    fallback read it for minutes); now every backend refuses it at once, naming the file."""
    from monai_wsi_ext.io.wsi import available_backends, open_slide

    path = make(tmp_path / "forged.tif")
    assert path.stat().st_size < 2048
    for backend in ["auto", *available_backends()]:
        t0 = time.perf_counter()
        with pytest.raises(WSIReadError, match=reason) as err:
            open_slide(path, backend=backend)
        assert time.perf_counter() - t0 < 5
        assert str(path) in str(err.value)


def test_real_slides_pass_the_declared_size_check(shared_data):
    from monai_wsi_ext.io.wsi import open_slide

    for name in ("cmu_small_region.svs", "tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif"):
        with open_slide(shared_data / "slides" / name) as slide:
            assert slide.dimensions[0] > 0


def test_thumbnail_over_the_read_budget_is_refused(shared_data):
    """A single-level slide larger than the read budget is refused with a message naming the file and what to do,
    instead of being decoded whole."""
    from monai_wsi_ext.io.wsi import open_slide

    path = shared_data / "slides" / "kidney-48-5.tif"  # flat, 1493 x 901: 1.35 Mpx in one level
    with open_slide(path) as slide:
        with pytest.raises(WSIReadError, match="read budget") as err:
            slide.thumbnail(max_size=512, max_read_pixels=1_000_000)
        assert str(path) in str(err.value) and "pyramid" in str(err.value)
        img, _ = slide.thumbnail(max_size=512, max_read_pixels=2_000_000)
        assert max(img.shape[:2]) <= 512


def test_thumbnail_reads_in_bounded_blocks(tmp_path, synthetic_slide, monkeypatch):
    """The reduced thumbnail of a single-level slide is read in blocks of bounded size (it was read in strips of
    the full level width, 915 MB per read for a 150000 px wide level) and equals the block average."""
    from monai_wsi_ext.io import wsi

    with wsi.open_slide(synthetic_slide) as s:
        level0 = s.read_region(0, 0, *s.dimensions, level=0)
    path = _flat_tiff(tmp_path / "flat.tif", level0)  # 1536 x 1536, one level
    monkeypatch.setattr(wsi, "_READ_BLOCK_PX", 256)
    reads = []
    with wsi.open_slide(path, mpp=0.5) as slide:
        original = slide.read_region

        def recording(x, y, width, height, level=0):
            reads.append((width, height))
            return original(x, y, width, height, level)

        slide.read_region = recording
        img, ds = slide.thumbnail(max_size=500)
    factor = 4  # ceil(1536 / 500)
    assert img.shape == (1536 // factor, 1536 // factor, 3) and ds == pytest.approx(factor)
    assert len(reads) > 1 and max(w * h for w, h in reads) <= 256 * 256
    expected = level0[:384 * factor, :384 * factor].reshape(384, factor, 384, factor, 3).mean(axis=(1, 3))
    assert np.abs(img.astype(float) - expected).max() <= 1.0


def test_slide_timeout_stops_a_slow_read_naming_the_slide(tmp_path, synthetic_slide, monkeypatch):
    """A per-slide time limit ends a read that takes too long with a WSIReadError (so a batch skips the slide and
    goes on); reads outside the limit are unaffected."""
    from monai_wsi_ext.io import wsi

    with wsi.open_slide(synthetic_slide) as s:
        level0 = s.read_region(0, 0, *s.dimensions, level=0)
    path = _flat_tiff(tmp_path / "slow.tif", level0)
    monkeypatch.setattr(wsi, "_READ_BLOCK_PX", 256)
    with wsi.open_slide(path, mpp=0.5) as slide:
        get_data = slide.reader.get_data

        def slow(*args, **kwargs):
            time.sleep(0.1)
            return get_data(*args, **kwargs)

        slide.reader.get_data = slow
        t0 = time.perf_counter()
        with pytest.raises(wsi.SlideTimeoutError, match="slide_timeout_s") as err:
            with wsi.slide_timeout(0.3, path):
                slide.thumbnail(max_size=500)  # 36 blocks of 0.1 s
        assert time.perf_counter() - t0 < 1.5
        assert isinstance(err.value, WSIReadError) and str(path) in str(err.value)
        with pytest.raises(wsi.SlideTimeoutError):
            with wsi.slide_timeout(0.2):
                list(slide.read_regions(np.zeros((40, 2), np.int64), 64, batch_size=4, num_workers=1))
        slide.reader.get_data = get_data
        with wsi.slide_timeout(None):  # None / 0: no limit
            slide.read_region(0, 0, 8, 8)
    with pytest.raises(ConfigError, match="slide_timeout_s"):
        with wsi.slide_timeout(-1):
            pass


def test_slide_timeout_helper_for_prepare_config(synthetic_slide):
    """``slide_timeout_for(cfg, inp)`` reads ``cfg.slide_timeout_s`` (the lead's PrepareConfig field); a deadline
    that has passed stops ``open_slide`` before it reads anything."""
    from monai_wsi_ext.io.wsi import SlideTimeoutError, open_slide
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, slide_timeout_for, validate_prepare_config

    cfg = PrepareConfig()
    cfg.slide_timeout_s = 1e-9  # set as the field would be
    inp = SlideInput(image=str(synthetic_slide))
    with pytest.raises(SlideTimeoutError):
        with slide_timeout_for(cfg, inp):
            time.sleep(0.01)
            open_slide(inp.image)
    cfg.slide_timeout_s = -5
    with pytest.raises(ConfigError, match="slide_timeout_s"):
        validate_prepare_config(cfg)


# ================================================================================================= 8. annotations
def test_annotation_in_another_coordinate_frame_fails_the_slide(tmp_path, synthetic_dataset):
    """The slide's own tumor annotation in level-0 coordinates of a 32x larger slide (all vertices outside): the
    slide used to become all-normal training data with exit 0; now it fails, naming the annotation file."""
    from monai_wsi_ext.io.annotations import read_annotations, write_asap_xml
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, prepare_dataset

    rec = synthetic_dataset.records[0]
    polygons = read_annotations(rec["asap_xml"])
    for p in polygons:
        p.exterior = p.exterior * 32 + 2000
        p.holes = [h * 32 + 2000 for h in p.holes]
    wrong = write_asap_xml(tmp_path / "wrong_frame.xml", polygons)
    inp = SlideInput(image=rec["image"], annotation=str(wrong), slide_id="s0")
    summary = prepare_dataset([inp], tmp_path / "out", PrepareConfig(patch_size=64), progress=False)
    assert "s0" in summary["failed"] and summary["done"] == []
    reason = summary["failed"]["s0"]
    assert "AnnotationError" in reason and str(wrong) in reason and "outside the slide" in reason


def test_camelyon16_annotation_on_a_small_slide_is_refused(shared_data):
    from monai_wsi_ext.io.annotations import check_annotation_extent, read_annotations

    path = shared_data / "annotations" / "camelyon16" / "Tumor_081.xml"
    polygons = read_annotations(path)
    with pytest.raises(AnnotationError, match="none of it lies on the slide") as err:
        check_annotation_extent(polygons, (2220, 2967), path_for_errors=path)
    assert str(path) in str(err.value)


def test_check_annotation_extent_fraction_and_clip():
    from monai_wsi_ext.io.annotations import AnnotationLabel, check_annotation_extent, polygons_area

    inside, outside, edge = _square(50, 50, 100), _square(5000, 5000, 100), _square(950, 950, 100)
    polys = [inside, outside, _square(0, 0, 50, label=AnnotationLabel.OTHER)]
    kept, notes = check_annotation_extent(polys, (1000, 1000))  # default: fail only when nothing lies on it
    assert kept is not None and len(notes) == 1 and "50.0%" in notes[0]
    with pytest.raises(AnnotationError, match="over the allowed 40%"):
        check_annotation_extent(polys, (1000, 1000), max_outside_fraction=0.4, path_for_errors="a.xml")
    with pytest.raises(AnnotationError, match="a.xml"):
        check_annotation_extent([outside], (1000, 1000), path_for_errors="a.xml")
    kept, notes = check_annotation_extent([inside, outside, edge], (1000, 1000), clip=True)
    assert len(kept) == 2 and "clipped" in notes[0]
    assert polygons_area(kept)[AnnotationLabel.TUMOR] == pytest.approx(100 * 100 + 50 * 50)
    assert check_annotation_extent([inside], (1000, 1000)) == ([inside], [])
    kept, notes = check_annotation_extent([outside], (1000, 1000), clip=True)  # clipping never fails
    assert kept == [] and notes
    with pytest.raises(ConfigError):
        check_annotation_extent([inside], (1000, 1000), max_outside_fraction=2)


def test_clip_option_in_label_mask(synthetic_dataset):
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, _label_mask_for
    from monai_wsi_ext.io.annotations import write_asap_xml

    rec = synthetic_dataset.records[0]
    path = Path(rec["asap_xml"]).with_name("far_away.xml")
    write_asap_xml(path, [_square(100000, 100000, 500)])
    cfg = PrepareConfig(patch_size=64)
    inp = SlideInput(image=rec["image"], annotation=str(path))
    with pytest.raises(AnnotationError):
        _label_mask_for(inp, cfg, (1536, 1536), 64.0)
    cfg.clip_annotations = True  # the lead's PrepareConfig field
    notes: list[str] = []
    mask, _ = _label_mask_for(inp, cfg, (1536, 1536), 64.0, warnings=notes)
    assert not mask.any() and any("outside the slide" in n for n in notes)


def test_ignored_classes_and_empty_files_are_warnings_as_data(tmp_path, shared_data):
    """An annotation class that is not tumor/normal/exclusion, and an empty FeatureCollection, used to be ignored
    without a word; they come back as warning texts for the summary."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, _label_mask_for

    cfg = PrepareConfig(patch_size=64)
    size = (1536, 1536)
    mixed = _geojson(tmp_path / "mixed.geojson", [("Tumor", [[10, 10], [500, 10], [500, 500]]),
                                                  ("Necrosis", [[600, 600], [900, 600], [900, 900]]),
                                                  ("Necrosis", [[600, 10], [900, 10], [900, 300]])])
    notes: list[str] = []
    mask, _ = _label_mask_for(SlideInput(image="x.tif", annotation=str(mixed)), cfg, size, 64.0, warnings=notes)
    assert (mask == 2).any()
    assert len(notes) == 1 and "'Necrosis' (2)" in notes[0] and str(mixed) in notes[0]
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    notes = []
    _label_mask_for(SlideInput(image="x.tif", annotation=str(empty)), cfg, size, 64.0, warnings=notes)
    assert len(notes) == 1 and "no annotation polygons" in notes[0] and "FeatureCollection" in notes[0]
    # the real QuPath export: its classes 'I' and 'UT' map to nothing, so the file contributes no label at all
    qupath = shared_data / "annotations" / "other" / "qupath05.geojson"
    notes = []
    try:
        _label_mask_for(SlideInput(image="x.tif", annotation=str(qupath)), cfg, (100000, 100000), 64.0,
                        warnings=notes)
    except AnnotationError:  # its polygons may lie outside a made-up slide size; the class note comes first
        pass
    assert any("every polygon" in n and "'UT'" in n for n in notes)


def test_annotation_file_that_matches_no_slide_is_reported(tmp_path, synthetic_slide, caplog):
    from monai_wsi_ext.prep.prepare import collect_inputs, unmatched_annotations

    slides, anns = tmp_path / "slides", tmp_path / "annotations"
    slides.mkdir()
    anns.mkdir()
    (slides / "case_01.tif").symlink_to(synthetic_slide)
    (anns / "case_01.xml").write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    (anns / "case_O1.xml").write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")  # typo: letter O
    with caplog.at_level("WARNING"):
        inputs = collect_inputs(slides, annotations=anns)
    assert [Path(i.annotation).name for i in inputs] == ["case_01.xml"]
    notes = unmatched_annotations(inputs, anns)
    assert len(notes) == 1 and "case_O1.xml" in notes[0] and "matches no slide" in notes[0]
    assert "case_O1.xml" in caplog.text


# ================================================================================================= 9. what is needed
def test_pen_marks_are_not_tissue_by_default(tmp_path, synthetic_slide):
    """Saturated blue, green and black strokes across tissue and glass were tissue (so 'normal' patches); they
    are excluded by default, and the option turns that off."""
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.tissue import detect_tissue, tissue_mask_from_image

    with open_slide(synthetic_slide) as s:
        image, _ = s.thumbnail(max_size=768)
    marked = image.copy()
    strokes = np.zeros(image.shape[:2], bool)
    for m, colour in _strokes(image.shape[:2]):
        marked[m] = colour
        strokes |= m
    path = _flat_tiff(tmp_path / "pen.tif", marked)
    with open_slide(path, mpp=4.0) as slide:  # a 3 mm field: strokes 12 px = 48 µm wide
        on = detect_tissue(slide, min_object_um2=2000, min_hole_um2=2000)
        off = detect_tissue(slide, min_object_um2=2000, min_hole_um2=2000, exclude_ink=False)
    assert (off.mask & strokes).mean() > 0.3 * strokes.mean()  # without the exclusion ink is tissue
    assert (on.mask & strokes).sum() == 0
    assert on.ink_fraction >= strokes.mean()
    clean = tissue_mask_from_image(image, min_object_px=125, min_hole_px=125)
    away = ~np.asarray(__import__("scipy").ndimage.binary_dilation(strokes, iterations=6))
    a, b = clean.mask & away, on.mask & away
    assert (a & b).sum() / max((a | b).sum(), 1) > 0.97  # the tissue away from the strokes is kept


def test_ink_exclusion_keeps_real_unmarked_tissue(shared_data):
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.tissue import detect_tissue

    for name in ("cmu_small_region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        with open_slide(shared_data / "slides" / name) as slide:
            on, off = detect_tissue(slide, max_size=1024), detect_tissue(slide, max_size=1024, exclude_ink=False)
        assert off.mask.sum() > 0 and (off.mask & ~on.mask).sum() <= 0.01 * off.mask.sum()


def test_no_tissue_slide_has_no_score_and_status_no_tissue(tmp_path):
    """An all-background grid was written with a confident slide_score 0.0; it is null with status no_tissue."""
    from monai_wsi_ext.outputs.writers import slide_score, write_slide_outputs

    empty = np.full((6, 8), np.nan, np.float32)
    assert slide_score(empty) is None
    res = write_slide_outputs(tmp_path / "a", "blank", empty, 256.0, (2048, 1536), 0.5, None, None)
    record = json.loads(Path(res["record_json"]).read_text())
    assert res["slide_score"] is None and res["status"] == "no_tissue"
    assert record["slide_score"] is None and record["status"] == "no_tissue" and record["n_tissue_cells"] == 0
    prob = empty.copy()
    prob[2, 3] = 0.7
    res = write_slide_outputs(tmp_path / "b", "one", prob, 256.0, (2048, 1536), 0.5, None, None)
    assert res["status"] == "ok" and res["slide_score"] == pytest.approx(0.7)


def test_prepared_slide_status_helper():
    from monai_wsi_ext.prep.prepare import slide_status

    assert slide_status({"counts": {"cells": 0}}) == "no_tissue"
    assert slide_status({"counts": {"cells": 3}}) == "ok"


@pytest.mark.parametrize("mpp", [0, -0.25, float("nan"), float("inf"), "abc"])
def test_non_positive_mpp_is_an_error(synthetic_slide, mpp):
    """``--mpp -0.25`` used to be taken as is (tissue sizes squared it back to positive); it is an error."""
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.prepare import PrepareConfig, validate_prepare_config

    with pytest.raises(ConfigError, match="`mpp` must be a positive number"):
        open_slide(synthetic_slide, mpp=mpp)
    with pytest.raises(ConfigError, match="mpp"):
        validate_prepare_config(PrepareConfig(mpp=mpp))


def test_symlink_loop_and_broken_link_are_named(tmp_path, synthetic_dataset):
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset

    a, b = tmp_path / "a.svs", tmp_path / "b.svs"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(WSIReadError, match="symlink loop") as err:
        open_slide(a)
    assert "not found" not in str(err.value)
    broken = tmp_path / "broken.tif"
    broken.symlink_to(tmp_path / "gone.tif")
    with pytest.raises(WSIReadError, match="broken symlink"):
        open_slide(broken)
    # an annotation link that loops is taken (and fails the slide), not silently treated as "no annotation"
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "s.tif").symlink_to(synthetic_dataset.slide(0))
    (folder / "s.xml").symlink_to(folder / "s.xml")
    inputs = collect_inputs(folder)
    assert inputs[0].annotation == str(folder / "s.xml")
    summary = prepare_dataset(inputs, tmp_path / "out", PrepareConfig(patch_size=64), progress=False)
    assert "s" in summary["failed"] and "symbolic links" in summary["failed"]["s"]


def test_missing_mpp_is_a_warning_for_the_summary(shared_data):
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.tissue import detect_tissue

    with open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs") as slide:  # no mpp in the header
        assert slide.mpp is None and any("no mpp" in w for w in slide.warnings)
        tissue = detect_tissue(slide, max_size=512)
    assert any("assumed 0.5 µm/px" in w for w in tissue.warnings)
    with open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as slide:
        assert slide.warnings == [] and detect_tissue(slide, max_size=512).warnings == []


def test_manifest_negative_key_labels_all_tissue_normal(tmp_path, synthetic_dataset):
    """``"negative": true`` in a manifest was ignored (the slide became all 'nolabel'); it declares the slide
    tumor-free. A labelled slide with neither annotation nor declaration is reported."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, label_warnings, prepare_slide

    rec = synthetic_dataset.records[0]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"slides": [
        {"id": "neg", "image": rec["image"], "split": "train", "negative": True},
        {"id": "unlabelled", "image": rec["image"], "split": "train"},
        {"id": "test_case", "image": rec["image"], "split": "test"},
    ]}))
    neg, unlabelled, test_case = collect_inputs(manifest=manifest)
    assert neg.extra.get("negative") is True and not unlabelled.extra.get("negative")
    meta = prepare_slide(neg, tmp_path / "out", PrepareConfig(patch_size=64))
    assert meta["counts"]["normal"] > 0 and meta["counts"]["tumor"] == 0
    assert meta["counts"]["nolabel"] < meta["counts"]["normal"]
    assert label_warnings(neg) == [] and label_warnings(test_case) == []
    notes = label_warnings(unlabelled)
    assert len(notes) == 1 and "not declared negative" in notes[0]


def test_collect_inputs_negative_option(tmp_path, synthetic_slide):
    from monai_wsi_ext.prep.prepare import collect_inputs

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("n1.tif", "t1.tif"):
        (folder / name).symlink_to(synthetic_slide)
    inputs = collect_inputs(folder, negative=["n1"])
    assert [bool(i.extra.get("negative")) for i in inputs] == [True, False]
    assert all(i.extra.get("negative") for i in collect_inputs(folder, negative=True))
    with pytest.raises(ConfigError, match="n2"):
        collect_inputs(folder, negative=["n2"])


# ================================================================================================= 10. noise
def test_cucim_cpu_noise_is_silenced(tmp_path, shared_data):
    """cuCIM imported after PyTorch on a machine without a CUDA driver printed `dlopen error libcuda.so.1` and
    `cuFile initialization failed` on stdout and wrote cufile.log into the working directory."""
    pytest.importorskip("cucim")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUFILE_") and k != "MONAI_WSI_EXT_CUCIM_QUIET"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import torch\nfrom monai_wsi_ext.io.wsi import open_slide\n"
            f"s = open_slide({str(shared_data / 'slides' / 'cmu_small_region.svs')!r})\nprint('opened', s.backend)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "opened" in out.stdout
    assert "dlopen error" not in text and "cuFile initialization failed" not in text, text
    assert not (tmp_path / "cufile.log").exists()


def test_slide_meta_extras_collects_every_warning(shared_data, tmp_path):
    """What the lead's ``prepare_in_memory`` puts into ``meta.json`` (``warnings``, ``status``): the label notes,
    the slide's (no mpp), tissue detection's (assumed mpp) and no tissue."""
    from monai_wsi_ext.io.wsi import open_slide
    from monai_wsi_ext.prep.grid import make_grid
    from monai_wsi_ext.prep.prepare import SlideInput, label_warnings, slide_meta_extras, summary_warnings
    from monai_wsi_ext.prep.tissue import detect_tissue

    path = shared_data / "slides" / "kidney-48-5.tif"  # nearly blank, no mpp
    inp = SlideInput(image=str(path), split="training")
    notes = label_warnings(inp)
    with open_slide(path) as slide:
        tissue = detect_tissue(slide, max_size=512)
        grid = make_grid(inp.slide_id, slide.dimensions, tissue.mask, tissue.downsample, 64)
        extras = slide_meta_extras(slide, tissue, grid, notes)
    assert extras["status"] == "no_tissue"
    text = "\n".join(extras["warnings"])
    assert "not declared negative" in text and "no mpp" in text and "assumed 0.5" in text and "no tissue" in text
    summary = summary_warnings({inp.slide_id: extras, "other": {"warnings": []}}, ["x.xml: matches no slide"])
    assert summary == {"dataset": ["x.xml: matches no slide"], inp.slide_id: extras["warnings"]}
