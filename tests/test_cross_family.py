"""Cross-family experiments (issue 11): ``run_experiment.py --preset cross_family_quick`` trains on one slide family
and tests on every family; per-family and pooled cross-family tables, the pooled numbers recomputed here
independently (scikit-learn, scipy) from the heatmaps' patch data."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("synthetic", "texture", "cells")
METHODS = ("classifier", "separate")


def _script():
    spec = importlib.util.spec_from_file_location("run_experiment_script", REPO / "scripts" / "run_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("xfam") / "run"
    proc = subprocess.run([sys.executable, "scripts/run_experiment.py", "run", "--preset", "cross_family_quick",
                           "--output_dir", str(out), "--threads", "1"],
                          cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def _patches(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        p = np.load(sub / f"{sub.name}_prob.npy")
        y = np.load(sub / f"{sub.name}_labels.npy")
        keep = (y == 0) | (y == 1)
        probs.append(p[keep])
        labels.append(y[keep])
    return np.concatenate(probs), np.concatenate(labels)


def _tumor_points(folder: Path, threshold: float = 0.5) -> list[int]:
    """Per slide: 8-connected predicted-tumor components (prob > threshold, tissue) lying entirely in normal cells."""
    from scipy.ndimage import label

    counts = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        p = np.load(sub / f"{sub.name}_prob.npy")
        y = np.load(sub / f"{sub.name}_labels.npy")
        pred = np.nan_to_num(p, nan=0.0) > threshold
        pred &= y != -2
        comp, n = label(pred, structure=np.ones((3, 3), bool))
        counts.append(sum(bool(np.all(y[comp == k] == 0)) for k in range(1, n + 1)))
    return counts


def test_presets_and_defaults():
    mod = _script()
    quick_cfg = mod.load_preset("cross_family_quick")
    real = mod.load_preset("cross_family")
    for cfg in (quick_cfg, real):
        assert cfg["data"]["family"] == "synthetic" and cfg["test_families"] == list(FAMILIES)
        assert cfg["data"]["read_mpp"] == 0.5 and cfg["data"]["patch_size"] == 64
        assert cfg["methods"] == ["classifier", "separate"]
    assert quick_cfg["seeds"] == [0] and real["seeds"] == [0, 1]
    # an old preset keeps today's behaviour: only the training family, read at level 0
    merged = mod._merge(mod.load_preset("quick"), {})
    assert merged["data"]["family"] == "synthetic" and merged["test_families"] == ["synthetic"]
    assert merged["data"].get("read_mpp") is None
    # command-line overrides; the training family is always tested too
    merged = mod._merge(mod.load_preset("quick"), {"test_families": "cells,texture"})
    assert merged["test_families"] == ["synthetic", "cells", "texture"] and merged["data"]["read_mpp"] == 0.5
    with pytest.raises(SystemExit, match="unknown slide family"):
        mod._merge(mod.load_preset("quick"), {"test_families": "camelyon"})


def test_generator_kwargs_share_the_cell_size():
    from monai_wsi_ext.testing.cross_family import family_generator_kwargs

    data = {"size": 2048, "patch_size": 64, "read_mpp": 0.5, "generator": {"tumor_points": 6}}
    syn = family_generator_kwargs("synthetic", data, {}, training=True)
    assert syn == {"width": 2048, "height": 2048, "patch_size": 64, "mpp": 0.5, "tumor_points": 6}
    assert family_generator_kwargs("texture", data, {"tumor_points": 2})["mpp"] == 0.5
    cells = family_generator_kwargs("cells", data, {})
    assert cells["grid_mpp"] == 0.5 and cells["mpps"] == (0.25, 0.5) and "tumor_points" not in cells
    # without read_mpp (old presets): the generator's own defaults
    assert "mpp" not in family_generator_kwargs("synthetic", {"size": 512, "patch_size": 64})


def test_difference_rows():
    from monai_wsi_ext.testing.cross_family import difference_rows, difference_table

    def m(acc, pts):
        return {"pooled_accuracy": acc, "pooled_pr_auc": acc, "pooled_roc_auc": None, "mean_tumor_points": pts,
                "mean_dice": acc}

    per_seed = {0: {"classifier": m(0.8, 4.0), "separate": m(0.9, 1.0)},
                1: {"classifier": m(0.7, 2.0), "separate": m(0.6, 3.0)}}
    (row,) = difference_rows(per_seed, ["classifier", "separate"])
    assert row["pooled_accuracy"]["values"] == pytest.approx([0.1, -0.1])
    assert row["pooled_accuracy"]["mean"] == pytest.approx(0.0) and row["pooled_accuracy"]["better"] == 1
    assert row["mean_tumor_points"]["values"] == pytest.approx([-3.0, 1.0])
    assert row["mean_tumor_points"]["better"] == 1  # fewer tumor points is better
    assert row["pooled_roc_auc"]["values"] == []
    text = difference_table([row])
    assert "Separate learning − classifier" in text and "0.00 ± 14.14 (1/2)" in text and "n/a" in text


def test_quick_cross_family_tables(quick):
    out, results = quick
    assert results["train_family"] == "synthetic" and results["test_families"] == list(FAMILIES)
    assert results["cell_um"] == pytest.approx(32.0)
    # every family prepared with the same physical cell (cells slides at 0.25 µm/px read at level 1)
    levels = set()
    for folder in ("prepared", "prepared_texture", "prepared_cells"):
        metas = [json.loads(p.read_text()) for p in sorted((out / folder).glob("*/meta.json"))]
        assert metas
        for meta in metas:
            assert meta["cell_size"] * meta["mpp"] == pytest.approx(32.0)
            levels.add(meta["level"])
    assert levels == {0, 1}
    md = (out / "results.md").read_text()
    for heading in ("## In-family: test on `synthetic`", "## Cross-family, pooled: test on `texture`, `cells`",
                    "## Test family `texture`", "## Test family `cells`"):
        assert heading in md
    rows = [line for line in md.splitlines() if line.startswith("| Classifier only") or
            line.startswith("| Separate learning |")]
    assert len(rows) == 2 * 4  # two methods in the in-family, pooled and two family tables
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")][1:5]  # accuracy, PR-AUC, ROC-AUC, tumor points
        assert all(math.isfinite(float(c.split(" ")[0])) for c in cells), line
    assert md.count("| Separate learning − classifier |") == 4
    entries = {**{f: results["families"][f] for f in FAMILIES}, "pooled": results["cross_family"]}
    for name, entry in entries.items():
        assert [r["method"] for r in entry["summary"]] == list(METHODS)
        for row in entry["summary"]:
            for key in ("pooled_accuracy", "pooled_pr_auc", "pooled_roc_auc", "mean_tumor_points"):
                assert math.isfinite(row[key]["mean"]), (name, row["method"], key)
        (diff,) = entry["differences"]
        assert diff["method"] == "separate" and math.isfinite(diff["pooled_pr_auc"]["mean"])
    assert results["summary"] == results["families"]["synthetic"]["summary"]  # the old key: in-family
    for fam in ("texture", "cells"):
        assert (out / f"figure_{fam}.png").is_file()
        for method in METHODS:
            assert (out / "seed_0" / f"heatmaps_{fam}" / method / "metrics_overall.json").is_file()


def test_pooled_numbers_match_an_independent_recomputation(quick):
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    out, results = quick
    assert results["cross_family"]["families"] == ["texture", "cells"]
    for method in METHODS:
        folders = [out / "seed_0" / f"heatmaps_{fam}" / method for fam in ("texture", "cells")]
        parts = [_patches(f) for f in folders]
        p = np.concatenate([a for a, _ in parts])
        y = np.concatenate([b for _, b in parts])
        assert np.isfinite(p).all() and 0 < y.sum() < y.size
        points = [n for f in folders for n in _tumor_points(f)]
        pooled = results["cross_family"]["per_seed"]["0"][method]
        on_disk = json.loads((out / "seed_0" / "pooled_cross_family" / method / "metrics_overall.json").read_text())
        assert on_disk["pooled_accuracy"] == pytest.approx(pooled["pooled_accuracy"])
        assert pooled["n_slides"] == len(points) == 2 and pooled["pooled_n"] == y.size
        assert pooled["pooled_n_tumor"] == int(y.sum())
        assert pooled["pooled_accuracy"] == pytest.approx(accuracy_score(y, (p > 0.5).astype(int)), abs=1e-12)
        assert pooled["pooled_pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert pooled["pooled_roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert pooled["mean_tumor_points"] == pytest.approx(np.mean(points))
        assert pooled["total_tumor_points"] == sum(points)
        row = next(r for r in results["cross_family"]["summary"] if r["method"] == method)
        assert row["pooled_pr_auc"]["mean"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        # each family's own table is evaluate.json's, and agrees with the same recomputation
        for fam, folder in zip(("texture", "cells"), folders):
            pf, yf = _patches(folder)
            overall = results["families"][fam]["per_seed"]["0"][method]
            assert overall["pooled_accuracy"] == pytest.approx(accuracy_score(yf, (pf > 0.5).astype(int)))
            if 0 < yf.sum() < yf.size:
                assert overall["pooled_pr_auc"] == pytest.approx(average_precision_score(yf, pf))
    diff = results["cross_family"]["differences"][0]
    sep = results["cross_family"]["per_seed"]["0"]["separate"]
    cls = results["cross_family"]["per_seed"]["0"]["classifier"]
    assert diff["pooled_pr_auc"]["values"] == pytest.approx([sep["pooled_pr_auc"] - cls["pooled_pr_auc"]])


def test_validation_threshold_tables_match_an_independent_recomputation(quick):
    """``validation_threshold: accuracy`` (the quick preset): per method the cut that maximises accuracy on the
    validation slides' heatmaps (brute force here), and every test table rescored at it."""
    from sklearn.metrics import accuracy_score

    out, results = quick
    vt = results["validation_threshold"]
    assert vt["criterion"] == "accuracy" and (out / "results_validation_threshold.md").is_file()
    for method in METHODS:
        val = out / "seed_0" / "heatmaps_validation" / method
        pv, yv = _patches(val)
        assert 0 < yv.sum() < yv.size
        t = vt["calibration"]["0"][method]["threshold"]
        best = max(accuracy_score(yv, (pv > c).astype(int)) for c in np.concatenate([[-1.0], pv]))
        assert accuracy_score(yv, (pv > t).astype(int)) == pytest.approx(best, abs=1e-12)
        for fam in FAMILIES:
            folder = out / "seed_0" / ("heatmaps" if fam == "synthetic" else f"heatmaps_{fam}") / method
            pf, yf = _patches(folder)
            row = vt["families"][fam]["per_seed"]["0"][method]
            assert row["threshold"] == pytest.approx(t)
            assert row["pooled_accuracy"] == pytest.approx(accuracy_score(yf, (pf > t).astype(int)), abs=1e-12)
            assert row["mean_tumor_points"] == pytest.approx(np.mean(_tumor_points(folder, t)))
        parts = [_patches(out / "seed_0" / f"heatmaps_{fam}" / method) for fam in ("texture", "cells")]
        p, y = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
        pooled = vt["cross_family"]["per_seed"]["0"][method]
        assert pooled["pooled_accuracy"] == pytest.approx(accuracy_score(y, (p > t).astype(int)), abs=1e-12)
        # ranking measures do not move with the threshold
        at_half = results["cross_family"]["per_seed"]["0"][method]
        assert pooled["pooled_roc_auc"] == pytest.approx(at_half["pooled_roc_auc"])


def test_mixed_training_families(tmp_path):
    """``data.family: "synthetic+cells"``: both families' splits generated, one merged manifest with the ids prefixed
    by the family, prepared into one folder whose slides find their truth through the merged manifest; a family of
    the mix cannot also be a cross-family test family."""
    from monai_wsi_ext.evaluation.report import find_truth
    from monai_wsi_ext.testing import cross_family as xf

    mod = _script()
    merged = mod._merge(mod.load_preset("cross_family_quick"),
                        {"family": ["synthetic", "cells"], "test_families": "texture"})
    assert merged["data"]["family"] == "synthetic+cells" and merged["test_families"] == ["synthetic+cells", "texture"]
    assert xf.family_components("synthetic+cells") == ["synthetic", "cells"]
    with pytest.raises(SystemExit, match="cannot be a cross-family test family"):
        mod._merge(mod.load_preset("cross_family_quick"), {"family": "synthetic+cells"})  # preset tests cells too
    with pytest.raises(SystemExit, match="unknown slide family"):
        mod._merge(mod.load_preset("quick"), {"family": "synthetic+camelyon"})

    data = {"size": 512, "patch_size": 64, "read_mpp": 0.5, "n_train": 1, "n_val": 1, "n_test": 1, "data_seed": 0}
    kwargs = {"synthetic": {"tumor_regions": 1, "n_lumps": 1}, "cells": {"width": 512, "height": 512}}
    with pytest.raises(SystemExit, match="family_kwargs"):
        xf.generate_training_set(tmp_path / "bad", "synthetic+cells", {**data, "generator": {"tumor_points": 1}})
    manifest = xf.generate_training_set(tmp_path, "synthetic+cells", data, kwargs)
    assert manifest == tmp_path / "data" / "manifest.json"
    records = json.loads(manifest.read_text())["slides"]
    ids = sorted(r["id"] for r in records)
    assert ids == sorted(f"{f}_{s}_000" for f in ("synthetic", "cells") for s in ("train", "val", "test"))
    assert {r["family"] for r in records} == {"synthetic", "cells"}
    for rec in records:  # paths relative to the merged manifest, pointing into data_<family>/
        assert (manifest.parent / rec["image"]).resolve() == (tmp_path / f"data_{rec['family']}" /
                                                              rec["image"].split(f"data_{rec['family']}/")[1])
        assert find_truth(rec["id"], manifest).is_file()
    xf.prepare_family(manifest, tmp_path / "prepared", data)
    datalist = json.loads((tmp_path / "prepared" / "datalist.json").read_text())
    assert {i["slide_id"] for i in datalist["training"]} == {"synthetic_train_000", "cells_train_000"}
    assert {i["slide_id"] for i in datalist["validation"]} == {"synthetic_val_000", "cells_val_000"}
    assert xf.check_cell_size({"mix": tmp_path / "prepared"}) == pytest.approx(32.0)
