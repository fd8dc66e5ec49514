"""Tests of slide reading (monai_wsi_ext.io.wsi): backends agree, batched reads, mpp handling, fallback and errors."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from monai_wsi_ext.io import wsi
from monai_wsi_ext.errors import WSIReadError
from monai_wsi_ext.io.wsi import BACKENDS, available_backends, open_slide

INSTALLED = available_backends()

# real files (see ../shared/data/README.md)
CMU = "slides/cmu_small_region.svs"
TCGA_J2K = "slides/tcga-cr-7395-01a-01-ts1.svs"
KIDNEY_FLAT = "slides/kidney-48-5.tif"


def _edge_of_tissue(record) -> tuple[int, int]:
    """Level-0 ``(x, y)`` of a point on the tissue outline of a synthetic slide, from its truth mask."""
    with np.load(record["truth"]) as z:
        tissue, ds = z["tissue"], int(z["downsample"])
    edge = tissue[1:-1, 1:-1] & ~tissue[1:-1, 2:]  # tissue with glass to its right
    r, c = np.argwhere(edge)[len(np.argwhere(edge)) // 2] + 1
    return int(np.clip(c * ds, 96, 1536 - 192)), int(np.clip(r * ds, 80, 1536 - 160))


def _region(slide, xy, level=0):
    """A 96 x 80 region around ``xy`` (tissue and glass), at ``level``."""
    return slide.read_region(xy[0] - 48, xy[1] - 40, 96, 80, level)


# ------------------------------------------------------------------------------------------------ synthetic slide
def test_all_backends_installed():
    # the environment installs all three; a missing one would silently shrink the agreement test below
    assert INSTALLED == list(BACKENDS)


@pytest.mark.parametrize("backend", INSTALLED)
def test_backends_agree_on_synthetic_slide(synthetic_dataset, synthetic_slide, backend):
    xy = _edge_of_tissue(synthetic_dataset.records[0])
    ref = open_slide(synthetic_slide, backend=INSTALLED[0])
    with open_slide(synthetic_slide, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.level_count == ref.level_count == 3
        assert slide.level_dimensions == ref.level_dimensions == [(1536, 1536), (768, 768), (384, 384)]
        np.testing.assert_allclose(slide.level_downsamples, [1.0, 2.0, 4.0], rtol=1e-4)
        assert slide.mpp == pytest.approx(0.5, abs=1e-3)
        assert slide.mpp_source == "file"
        assert slide.level_mpp(2) == pytest.approx(2.0, abs=4e-3)
        for level in (0, 1):
            a, b = _region(slide, xy, level), _region(ref, xy, level)
            assert a.shape == (80, 96, 3) and a.dtype == np.uint8
            assert np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() < 3.0
        # the region is not blank: tissue (dark) and glass (light) both present
        region = _region(slide, xy).astype(np.float32)
        assert region.std() > 10
    ref.close()


@pytest.mark.parametrize("backend", INSTALLED)
def test_read_regions_order_and_shapes(synthetic_slide, backend):
    locs = np.array([[0, 0], [640, 512], [1024, 1088], [320, 960], [1472, 1472]])
    with open_slide(synthetic_slide, backend=backend) as slide:
        batches = list(slide.read_regions(locs, (48, 32), level=0, num_workers=2, batch_size=2))
        assert [b.shape for b in batches] == [(2, 32, 48, 3), (2, 32, 48, 3), (1, 32, 48, 3)]
        assert all(b.dtype == np.uint8 for b in batches)
        stacked = np.concatenate(batches)
        singles = np.stack([slide.read_region(x, y, 48, 32, 0) for x, y in locs])
        np.testing.assert_array_equal(stacked, singles)  # same order as the locations
        # the patches differ from each other, so a reordering would have been seen
        assert len({p.tobytes() for p in singles}) == len(locs)
        one = list(slide.read_regions(locs[1:2], 64, level=1))
        assert len(one) == 1 and one[0].shape == (1, 64, 64, 3)
        np.testing.assert_array_equal(one[0][0], slide.read_region(640, 512, 64, 64, 1))
        assert list(slide.read_regions(np.zeros((0, 2)), 64)) == []


def test_level_for_mpp(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        assert [slide.level_for_mpp(m) for m in (0.5, 1.0, 2.0)] == [0, 1, 2]
        assert slide.level_for_mpp(1.08) == 1  # within the default 10 %
        assert slide.level_for_mpp(1.4, rtol=0.5) == 1
        with pytest.raises(WSIReadError, match="no level within") as err:
            slide.level_for_mpp(0.75)
        assert str(synthetic_slide) in str(err.value)


def test_user_mpp_overrides_file(synthetic_slide):
    with open_slide(synthetic_slide, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"
        assert slide.level_for_mpp(0.5) == 1


@pytest.mark.parametrize("max_size,expected_side,expected_ds", [(1536, 1536, 1.0), (400, 384, 4.0), (100, 96, 16.0)])
def test_thumbnail_size_bound(synthetic_slide, max_size, expected_side, expected_ds):
    with open_slide(synthetic_slide) as slide:
        img, ds = slide.thumbnail(max_size=max_size)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert max(img.shape[:2]) <= max_size
        assert img.shape[:2] == (expected_side, expected_side)
        assert ds == pytest.approx(expected_ds)
        img_l1, ds_l1 = slide.thumbnail(level=1)
        assert img_l1.shape == (768, 768, 3) and ds_l1 == pytest.approx(2.0)


def test_invalid_backend_name(synthetic_slide):
    with pytest.raises(ValueError, match="backend"):
        open_slide(synthetic_slide, backend="pillow")


# ------------------------------------------------------------------------------------------------ real files
def test_cmu_svs_mpp(shared_data):
    with open_slide(shared_data / CMU) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.mpp_source == "file"
        assert slide.level_count == 1 and slide.dimensions == (2220, 2967)
        img, ds = slide.thumbnail(max_size=1024)
        assert max(img.shape[:2]) <= 1024 and ds == pytest.approx(2220 / img.shape[1])


def test_jpeg2000_svs_without_mpp(shared_data):
    path = shared_data / TCGA_J2K
    with open_slide(path) as slide:
        assert slide.backend in INSTALLED
        assert slide.level_count == 2
        assert slide.level_dimensions == [(4443, 3567), (2221, 1783)]
        assert slide.mpp is None and slide.mpp_source == "none" and slide.level_mpp(1) is None
        region = slide.read_region(2000, 1500, 128, 96, 0)
        assert region.shape == (96, 128, 3) and region.std() > 5  # decoded, not a blank fill
        with pytest.raises(WSIReadError, match="mpp") as err:
            slide.level_for_mpp(0.5)
        assert str(path) in str(err.value)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"
        assert slide.level_for_mpp(0.5) == 1  # level 1 downsample is 2.0005


def test_flat_tiff_opens_and_reads(shared_data):
    with open_slide(shared_data / KIDNEY_FLAT) as slide:
        assert slide.backend in ("cucim", "tiffslide")  # cuCIM's slow path, or the fallback; never OpenSlide
        assert slide.level_count == 1 and slide.dimensions == (1493, 901)
        region = slide.read_region(500, 300, 200, 100)
        assert region.shape == (100, 200, 3) and region.mean() > 200  # nearly blank IHC slide
        batches = list(slide.read_regions([(0, 0), (256, 256), (1024, 512)], 128, batch_size=2))
        assert [b.shape for b in batches] == [(2, 128, 128, 3), (1, 128, 128, 3)]
        np.testing.assert_array_equal(batches[1][0], slide.read_region(1024, 512, 128, 128))


def test_forced_backend_that_cannot_read_raises(shared_data):
    path = shared_data / KIDNEY_FLAT
    with pytest.raises(WSIReadError, match="openslide") as err:
        open_slide(path, backend="openslide")
    assert str(path) in str(err.value)


def test_auto_falls_back_and_logs(shared_data, monkeypatch, caplog):
    path = shared_data / KIDNEY_FLAT
    # real auto: whatever it picks, a pick other than the first installed backend is logged as a fallback
    with caplog.at_level(logging.INFO, logger="monai_wsi_ext.io.wsi"):
        slide = open_slide(path)
    fallback_logged = any(r.levelno == logging.WARNING and "after" in r.getMessage() for r in caplog.records)
    assert fallback_logged == (slide.backend != INSTALLED[0])
    slide.close()
    # without cuCIM in the running, OpenSlide refuses the flat TIFF and tiffslide takes over, with a warning
    caplog.clear()
    monkeypatch.setattr(wsi, "available_backends", lambda: ["openslide", "tiffslide"])
    with caplog.at_level(logging.INFO, logger="monai_wsi_ext.io.wsi"):
        slide = open_slide(path)
    assert slide.backend == "tiffslide"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "using backend tiffslide after openslide" in warnings[0] and str(path) in warnings[0]
    assert slide.read_region(0, 0, 32, 32).shape == (32, 32, 3)
    slide.close()


# ------------------------------------------------------------------------------------------------ bad files
def _missing(tmp_path, _src):
    return tmp_path / "missing.tif"


def _empty(tmp_path, _src):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    return p


def _truncated(tmp_path, src):
    p = tmp_path / "truncated.tif"
    data = src.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _random_bytes(tmp_path, _src):
    p = tmp_path / "random.tif"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _text(tmp_path, _src):
    p = tmp_path / "notes.txt"
    p.write_text("not a slide\n")
    return p


def _folder(tmp_path, _src):
    p = tmp_path / "folder.svs"
    p.mkdir()
    return p


@pytest.mark.parametrize("make,reason", [
    (_missing, "not found"), (_empty, "empty"), (_truncated, "truncated"), (_random_bytes, "TIFF"),
    (_text, "no backend can read"), (_folder, "not a file"),
], ids=["missing", "empty", "truncated", "random_bytes", "text", "folder"])
def test_bad_files_raise_wsireaderror(tmp_path, synthetic_slide, make, reason):
    path = make(tmp_path, synthetic_slide)
    with pytest.raises(WSIReadError, match=reason) as err:
        open_slide(path)
    assert str(path) in str(err.value)
    assert err.value.path == str(path)
    assert isinstance(err.value, OSError)  # callers catching OSError skip the slide too


def test_truncated_copy_fails_for_every_forced_backend(tmp_path, synthetic_slide):
    path = _truncated(tmp_path, synthetic_slide)
    for backend in INSTALLED:
        with pytest.raises(WSIReadError, match="truncated"):
            open_slide(path, backend=backend)
    # the full copy still opens (the check is about the cut, not about the copy)
    full = tmp_path / "full.tif"
    shutil.copyfile(synthetic_slide, full)
    with open_slide(full) as slide:
        assert slide.dimensions == (1536, 1536)


# ------------------------------------------------------------------------------------------------ regressions
def test_read_regions_batches_stay_valid_after_later_reads(synthetic_slide):
    """Regression: numpy views of cuCIM batches were yielded as they were, and cuCIM reuses a batch's buffer once
    its iterator moves on, so batches kept by the caller (e.g. ``list(...)``) changed under it."""
    rng = np.random.default_rng(3)
    locs = rng.integers(0, 1536 - 64, (40, 2))
    with open_slide(synthetic_slide, backend="cucim") as slide:
        multi = list(slide.read_regions(locs, 64, batch_size=8))  # five cuCIM batches
        singles = [next(slide.read_regions(locs[i:i + 4], 64, batch_size=64)) for i in range(0, 40, 4)]
        for _ in slide.read_regions(locs[::-1], 64, batch_size=8):  # more reads that could reuse the memory
            pass
        expected = np.stack([slide.read_region(x, y, 64, 64) for x, y in locs])
    np.testing.assert_array_equal(np.concatenate(multi), expected)
    np.testing.assert_array_equal(np.concatenate(singles), expected)


def test_read_regions_across_cucim_spans_keeps_order(synthetic_slide):
    """Reads longer than one native cuCIM call (``_CUCIM_SPAN_BATCHES`` batches) come back whole and in order."""
    rng = np.random.default_rng(5)
    n = 2 * wsi._CUCIM_SPAN_BATCHES * 3 + 5  # two full spans of batch size 3 and a short one
    locs = rng.integers(0, 1536 - 32, (n, 2))
    with open_slide(synthetic_slide, backend="cucim") as slide:
        batches = list(slide.read_regions(locs, 32, batch_size=3))
        expected = np.stack([slide.read_region(x, y, 32, 32) for x, y in locs])
    assert sum(len(b) for b in batches) == n and max(len(b) for b in batches) == 3
    np.testing.assert_array_equal(np.concatenate(batches), expected)


_ABANDON_SCRIPT = """
import sys, threading
from monai_wsi_ext.io.wsi import open_slide
slide = open_slide(sys.argv[1], backend="cucim")
locs = [(x * 64, y * 64) for y in range(5) for x in range(4)]
def stop_after_one_batch():
    reads = slide.read_regions(locs, 64, batch_size=4, copy=False)
    next(reads)
    reads.close()
for _ in range(100):
    t = threading.Thread(target=stop_after_one_batch)
    t.start()
    t.join()
slide.close()
print("survived")
"""


def test_stopping_a_cucim_read_early_does_not_crash(synthetic_slide):
    """Regression: releasing a cuCIM batch iterator before its end corrupted the heap (SIGABRT, "corrupted
    double-linked list") in about one run in four -- it took down CI from ``iter_batches`` stopped early.
    100 early stops in threads crashed every time before the fix; run in a child process so a crash is a
    failure here, not the end of the suite."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ABANDON_SCRIPT, str(synthetic_slide)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_slide_patch_source_matches_read_region(synthetic_slide):
    import torch

    from monai_wsi_ext.data.patches import EvalTransform, SlidePatchSource

    xs, ys = np.meshgrid(np.arange(4, 9) * 64, np.arange(6, 10) * 64)
    source = SlidePatchSource(str(synthetic_slide), xs.ravel(), ys.ravel(), 0, 64, EvalTransform(None),
                              backend="cucim")
    with open_slide(synthetic_slide, backend="cucim") as slide:
        expected = np.stack([slide.read_region(x, y, 64, 64) for x, y in zip(xs.ravel(), ys.ravel())])
    per_patch = torch.stack([EvalTransform(None)(p) for p in expected])
    got = list(source.iter_batches(batch_size=8))
    assert [len(i) for i, _ in got] == [8, 8, 4]
    batches = torch.cat([b for _, b in got])
    assert batches.shape == (20, 3, 64, 64) and batches.dtype == torch.float32 and batches.is_contiguous()
    assert torch.equal(batches, per_patch)  # the batched conversion gives the per-patch values exactly
    np.testing.assert_array_equal(source.read_raw([7]), expected[7:8])  # one location: cuCIM's special case
    assert torch.equal(source.load([19, 0]), per_patch[[19, 0]])
    crop = EvalTransform(48)
    assert torch.equal(crop.apply_batch(expected), torch.stack([crop(p) for p in expected]))
    source.close()

    class KeepPixels:  # a transform whose output is a view of its input
        def apply_batch(self, raw, seeds=None):
            return torch.from_numpy(raw)

    # iter_batches transforms straight from cuCIM's reused buffers: outputs that alias them must still be right
    kept = SlidePatchSource(str(synthetic_slide), xs.ravel(), ys.ravel(), 0, 64, KeepPixels(), backend="cucim")
    np.testing.assert_array_equal(torch.cat([b for _, b in kept.iter_batches(batch_size=4)]).numpy(), expected)
    assert [i.tolist() for i, _ in kept.iter_batches(batch_size=16)] == [list(range(16)), [16, 17, 18, 19]]
    # stopping early leaves no reader running and the source usable
    first = next(iter(kept.iter_batches(batch_size=4)))
    assert first[0].tolist() == [0, 1, 2, 3]
    kept.close()


def test_thumbnail_is_decoded_once_per_open_slide(synthetic_slide, monkeypatch):
    """Tissue detection and the heatmap overlay of a slide ask for the same thumbnail: one decode, two copies."""
    from monai_wsi_ext.io.wsi import Slide, open_slide

    calls = []
    real = Slide._read_level
    monkeypatch.setattr(Slide, "_read_level", lambda self, *a: calls.append(a) or real(self, *a))
    with open_slide(synthetic_slide) as slide:
        first, ds1 = slide.thumbnail(max_size=512)
        first[:] = 0  # a caller's edit does not reach the next caller
        second, ds2 = slide.thumbnail(max_size=512)
        assert len(calls) == 1 and ds1 == ds2 and second.any()
        slide.thumbnail(max_size=256)
        assert len(calls) == 2
