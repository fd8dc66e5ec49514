"""Tests of the slide families (monai_wsi_ext.testing.families, scripts/make_family_slides.py): determinism, the
on-disk layout the project reads (reader, mpp, annotations, truth), the families' defining properties (real
texture in ``texture``; several mpp values, stain shifts, shaped ambiguity and tumor-free slides in ``cells``), and
``prepare_dataset`` on each family."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.testing.families import (
    CellsFamilyConfig,
    TextureFamilyConfig,
    generate_cells_slide,
    generate_family_dataset,
    generate_texture_slide,
    load_texture_bank,
)

REPO = Path(__file__).resolve().parents[1]
#: small ``texture`` slides: 1024 px at 0.5 µm/px, tumors small enough to fit
TEXTURE_KW = dict(width=1024, height=1024, tumor_radius_um=(110.0, 160.0), tumor_points=3, normal_islands=1)
#: small ``cells`` slides: a 512 µm field, 32 µm grid cells (0.25 µm/px slides are 2048 px)
CELLS_KW = dict(width=512, height=512, patch_size=32)
SUFFIXES = (".tif", ".xml", ".geojson", "_truth.npz")


def _files(tif: Path) -> list[Path]:
    stem = str(tif)[:-4]
    return [Path(stem + s) for s in SUFFIXES]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(manifest: Path) -> list[dict]:
    return json.loads(Path(manifest).read_text())["slides"]


def _truth(manifest: Path, rec: dict) -> dict:
    with np.load(Path(manifest).parent / rec["truth"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _gray(a: np.ndarray) -> np.ndarray:
    return a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _best_ncc(block: np.ndarray, images: list[np.ndarray]) -> float:
    """Best normalised cross-correlation of ``block`` (any of its 8 rotations/flips) inside ``images``."""
    from skimage.feature import match_template

    b, best = _gray(block), 0.0
    for k in range(8):
        t = np.rot90(b, k % 4)
        t = np.ascontiguousarray(t[:, ::-1] if k >= 4 else t)
        for im in images:
            best = max(best, float(match_template(_gray(im), t).max()))
    return best


def _tumor_cores(manifest: Path, rec: dict, n: int = 3, size: int = 48, mask: str = "tumor_looking",
                 step: int | None = None, ov: int | None = None) -> list[np.ndarray]:
    """Up to ``n`` blocks inside quilt-tile cores (one source crop, no seam) lying wholly in rendered tumor of a
    texture slide (truth ``mask`` with one truth pixel of margin; ``normal``: tissue that is not tumor-looking)."""
    import tifffile

    truth = _truth(manifest, rec)
    truth["normal"] = truth["tissue"] & ~truth["tumor_looking"]
    d, look = int(truth["downsample"]), truth[mask]
    step = step or rec["knobs"]["quilt_step"]
    ov = ov or rec["knobs"]["quilt_overlap"]
    image = tifffile.imread(Path(manifest).parent / rec["image"], level=0)
    out = []
    for iy in range(rec["height"] // step):
        for ix in range(rec["width"] // step):
            for dy in range(0, step - ov - size + 1, 8):
                for dx in range(0, step - ov - size + 1, 8):
                    x, y = ix * step + ov // 2 + dx, iy * step + ov // 2 + dy
                    cut = look[max(y // d - 1, 0):(y + size) // d + 2, max(x // d - 1, 0):(x + size) // d + 2]
                    if len(out) < n and cut.size and cut.all():
                        out.append(image[y:y + size, x:x + size])
                        break
                else:
                    continue
                break
    return out


def _tissue_pixels(manifest: Path, rec: dict, level: int = 0) -> np.ndarray:
    import tifffile

    image = tifffile.imread(Path(manifest).parent / rec["image"], level=level)
    truth = _truth(manifest, rec)
    d = float(truth["downsample"]) / 2**level
    r = np.minimum(((np.arange(image.shape[0]) + 0.5) / d).astype(int), truth["tissue"].shape[0] - 1)
    c = np.minimum(((np.arange(image.shape[1]) + 0.5) / d).astype(int), truth["tissue"].shape[1] - 1)
    return image[truth["tissue"][np.ix_(r, c)]]


def _histogram(pixels: np.ndarray) -> np.ndarray:
    q = (np.asarray(pixels).reshape(-1, 3) // 32).astype(np.int64)
    h = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512).astype(np.float64)
    return h / h.sum()


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def texture_manifest(shared_data, tmp_path_factory) -> Path:
    """One training and two test texture slides (the second test slide tumor-free)."""
    return generate_family_dataset(tmp_path_factory.mktemp("texture"), "texture", n_train=1, n_val=0, n_test=2,
                                   seed=0, source_dir=str(shared_data), **TEXTURE_KW)


@pytest.fixture(scope="module")
def cells_manifest(tmp_path_factory) -> Path:
    """One training, one validation and two test cells slides at 0.25, 0.5, 1.0 and 0.25 µm/px (the second test
    slide tumor-free)."""
    return generate_family_dataset(tmp_path_factory.mktemp("cells"), "cells", n_train=1, n_val=1, n_test=2, seed=0,
                                   **CELLS_KW)


@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory) -> Path:
    """One small slide of today's generator, through the family entry point."""
    return generate_family_dataset(tmp_path_factory.mktemp("synthetic"), "synthetic", n_train=1, n_val=0, n_test=0,
                                   seed=0, width=768, height=768, patch_size=64, truth_downsample=16)


# ------------------------------------------------------------------------------------------------------ tests


def test_cells_deterministic_by_seed(tmp_path):
    cfg = CellsFamilyConfig(width=256, height=256, patch_size=32, mpp=0.5)
    a, b, c = (generate_cells_slide(tmp_path / f"{n}.tif", seed, cfg) for n, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert a["stats"] == b["stats"]
    for fa, fb, fc in zip(_files(tmp_path / "a.tif"), _files(tmp_path / "b.tif"), _files(tmp_path / "c.tif")):
        assert _sha(fa) == _sha(fb), fa.name
        if fa.suffix == ".tif":
            assert _sha(fa) != _sha(fc)


def test_texture_deterministic_by_seed(shared_data, tmp_path):
    cfg = TextureFamilyConfig(width=512, height=512, source_dir=str(shared_data), source_part="train",
                              tumor_radius_um=(50.0, 80.0), tumor_points=2)
    for name in ("a", "b"):
        generate_texture_slide(tmp_path / f"{name}.tif", 11, cfg)
    generate_texture_slide(tmp_path / "c.tif", 12, cfg)
    for fa, fb, fc in zip(_files(tmp_path / "a.tif"), _files(tmp_path / "b.tif"), _files(tmp_path / "c.tif")):
        assert _sha(fa) == _sha(fb), fa.name
        if fa.suffix == ".tif":
            assert _sha(fa) != _sha(fc)


@pytest.mark.parametrize("family", ["texture", "cells", "synthetic"])
def test_layout_reader_mpp_and_annotations(family, request):
    """Every slide opens with the project's reader at its declared size and mpp; annotations parse, lie inside the
    slide and agree with the truth file; tumor-free slides have no tumor polygon."""
    from monai_wsi_ext.io.annotations import read_annotations
    from monai_wsi_ext.io.wsi import open_slide

    manifest = request.getfixturevalue({"texture": "texture_manifest", "cells": "cells_manifest",
                                        "synthetic": "synthetic_small"}[family])
    data = json.loads(Path(manifest).read_text())
    assert set(data["splits"]) == {"train", "val", "test"}
    root = Path(manifest).parent
    for rec in data["slides"]:
        with open_slide(root / rec["image"]) as slide:
            assert slide.dimensions == (rec["width"], rec["height"])
            assert slide.mpp == pytest.approx(rec["mpp"], rel=1e-3)
            assert slide.level_count == rec["levels"] >= 3
        truth = _truth(manifest, rec)
        assert truth["tumor"].shape == truth["tissue"].shape == truth["tumor_looking"].shape
        for key in ("asap_xml", "geojson"):
            polygons = read_annotations(root / rec[key])
            assert len(polygons) == rec["stats"]["tumor_polygons"] == int(truth["n_tumor_polygons"])
            for p in polygons:
                assert p.label.value == "tumor"
                assert (p.exterior >= 0).all() and (p.exterior[:, 0] <= rec["width"]).all()
                assert (p.exterior[:, 1] <= rec["height"]).all()
        if family == "synthetic":
            continue
        assert rec["family"] == family
        if rec["tumor_free"]:
            assert rec["stats"]["tumor_polygons"] == 0 and not truth["tumor"].any()
        else:
            assert rec["stats"]["tumor_polygons"] >= 1 and truth["tumor"].any()
            assert not (truth["tumor"] & ~truth["tissue"]).any()
    if family != "synthetic":
        assert [r["tumor_free"] for r in data["slides"] if r["split"] == "test"] == [False, True]


def test_cells_mpp_stain_and_ambiguity(cells_manifest):
    import tifffile

    recs = _records(cells_manifest)
    assert [r["mpp"] for r in recs] == [0.25, 0.5, 1.0, 0.25]
    # the same tissue field in µm: level-0 size scales with 1 / mpp and every slide has a 1.0 µm/px level
    for r in recs:
        assert r["width"] == round(512 * 1.0 / r["mpp"])
        assert r["width"] * r["mpp"] == pytest.approx(512)
    truths = [_truth(cells_manifest, r) for r in recs]
    h = np.stack([t["h_od"] for t in truths])
    e = np.stack([t["e_od"] for t in truths])
    spread = max(np.abs(h[i] - h[j]).max() + np.abs(e[i] - e[j]).max() for i in range(4) for j in range(i))
    assert spread > 0.05
    # the stain shows in the pixels: mean tissue colour at 1 µm/px differs between slides
    means = []
    for r in recs:
        level = {0.25: 2, 0.5: 1, 1.0: 0}[r["mpp"]]
        with tifffile.TiffFile(Path(cells_manifest).parent / r["image"]) as tif:
            assert tif.pages[level].shape[1] == 512
        means.append(_tissue_pixels(cells_manifest, r, level).reshape(-1, 3).mean(0))
    assert max(np.abs(a - b).max() for a in means for b in means) > 8
    # shaped ambiguity: both directions, several shapes, each where its ground truth says
    kinds = np.concatenate([t["mimic_kind"] for t in truths])
    shapes = np.concatenate([t["mimic_shape"] for t in truths])
    assert {"false_tumor", "false_normal"} <= set(kinds.tolist())
    assert len(set(shapes.tolist())) >= 2
    for r, t in zip(recs, truths):
        d = int(t["downsample"])
        for (x, y), kind in zip(t["mimic_centers"], t["mimic_kind"]):
            near = (slice(max(int(y // d) - 1, 0), int(y // d) + 2), slice(max(int(x // d) - 1, 0), int(x // d) + 2))
            if kind == "false_tumor":  # rendered tumor, truth normal
                assert (t["tumor_looking"][near] & ~t["tumor"][near]).any()
            else:  # rendered normal, truth tumor
                assert (t["tumor"][near] & ~t["tumor_looking"][near]).any()
        if r["tumor_free"]:
            assert (kinds.size > 0) and t["tumor_looking"].any() and not t["tumor"].any()


def test_texture_pixels_come_from_the_real_patches(texture_manifest, synthetic_small, shared_data):
    """Tumor tiles are crops of the real TUM patches, of the training half for training slides and of the other
    half for test slides; the tissue colours are those of the real sources, not of the synthetic generator."""
    recs = {r["id"]: r for r in _records(texture_manifest)}
    tum = {part: load_texture_bank(shared_data, part)["TUM"] for part in ("train", "test")}
    for sid, part, other in (("train_000", "train", "test"), ("test_000", "test", "train")):
        blocks = _tumor_cores(texture_manifest, recs[sid])
        assert blocks, sid
        for block in blocks:
            own, foreign = _best_ncc(block, tum[part]), _best_ncc(block, tum[other])
            assert own > 0.9 and foreign < 0.8, (sid, own, foreign)
    # normal tissue too is made of real crops (a block may straddle two classes' blend: one of two must match)
    sources = {part: [im for ims in load_texture_bank(shared_data, part).values() for im in ims]
               for part in ("train", "test")}
    blocks = _tumor_cores(texture_manifest, recs["train_000"], n=2, mask="normal")
    assert max(_best_ncc(b, sources["train"]) for b in blocks) > 0.9
    syn = _records(synthetic_small)[0]
    syn_blocks = _tumor_cores(synthetic_small, syn, n=1, mask="tissue", step=96, ov=32)
    assert syn_blocks
    for block in syn_blocks:  # the synthetic generator's tissue is no crop of the real sources
        assert _best_ncc(block, sources["train"] + sources["test"]) < 0.8
    # colour statistics: histogram intersection with the real sources
    bank = {p: np.concatenate([im.reshape(-1, 3) for ims in load_texture_bank(shared_data, p).values()
                               for im in ims]) for p in ("train", "test")}
    syn_hist = _histogram(_tissue_pixels(synthetic_small, syn))
    for rec in recs.values():
        part = "test" if rec["split"] == "test" else "train"
        ref = _histogram(bank[part])
        own = np.minimum(_histogram(_tissue_pixels(texture_manifest, rec)), ref).sum()
        assert own > np.minimum(syn_hist, ref).sum() + 0.1, rec["id"]


@pytest.mark.parametrize("family", ["texture", "cells"])
def test_prepare_dataset_labels(family, request, tmp_path):
    """``prepare_dataset`` runs unchanged: tumor patches on tumor slides, none on tumor-free slides (cells read at
    the common 1 µm/px level of their mixed-mpp pyramids)."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset

    manifest = request.getfixturevalue(f"{family}_manifest")
    cfg = (PrepareConfig(patch_size=64, thumbnail_max_size=512) if family == "texture"
           else PrepareConfig(patch_size=32, target_mpp=1.0, thumbnail_max_size=512))
    summary = prepare_dataset(collect_inputs(manifest=manifest), tmp_path / "prepared", cfg, progress=False)
    assert not summary["failed"]
    for rec in _records(manifest):
        counts = summary["slides"][rec["id"]]["counts"]
        assert counts["normal"] > 0, rec["id"]
        if rec["tumor_free"]:
            assert counts["tumor"] == 0, rec["id"]
        else:
            assert counts["tumor"] > 0, rec["id"]
        if family == "cells":
            meta = json.loads((tmp_path / "prepared" / rec["id"] / "meta.json").read_text())
            assert meta["level"] == {0.25: 2, 0.5: 1, 1.0: 0}[rec["mpp"]]
            assert meta["cell_size"] == round(32 / rec["mpp"])


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown family"):
        generate_family_dataset(tmp_path, "nope")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "missing"))):
        generate_family_dataset(tmp_path / "out", "texture", n_train=1, n_val=0, n_test=0,
                                source_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown or per-slide"):
        generate_family_dataset(tmp_path / "out", "cells", n_train=1, mpp=0.5)
    with pytest.raises(ConfigError, match="CellsFamilyConfig.width"):
        CellsFamilyConfig(width=10)


def test_cli_and_kept_slides(tmp_path, venv_python):
    cmd = [venv_python, str(REPO / "scripts" / "make_family_slides.py"), "--family", "cells", "--out_dir",
           str(tmp_path), "--n_train", "1", "--n_val", "0", "--n_test", "1", "--seed", "2", "--width", "256",
           "--height", "256", "--patch_size", "32", "--mpps", "(0.5, 1.0)"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    manifest = Path(out.stdout.strip().splitlines()[-1])
    assert manifest == tmp_path / "manifest.json"
    recs = _records(manifest)
    assert [(r["id"], r["mpp"]) for r in recs] == [("train_000", 0.5), ("test_000", 1.0)]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "slides").iterdir()}
    again = generate_family_dataset(tmp_path, "cells", n_train=1, n_val=0, n_test=1, seed=2, mpps=(0.5, 1.0),
                                    width=256, height=256, patch_size=32)
    assert _records(again) == recs
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "slides").iterdir()} == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
