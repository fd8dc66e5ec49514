"""Out-of-fold features for the canvas U-Net (issue 11 ablation): fold bookkeeping, and an experiment run whose U-Net
trains on features of training slides encoded by an encoder that never saw them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.testing.out_of_fold import assemble_features, assign_folds, subset_prepared

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def test_assign_folds_partitions_the_slides():
    folds = assign_folds(["t3", "t0", "t2", "t1", "t4"], 2)
    assert folds == [["t0", "t2", "t4"], ["t1", "t3"]]
    assert sorted(sum(folds, [])) == ["t0", "t1", "t2", "t3", "t4"]
    with pytest.raises(ConfigError, match="at least 2 folds"):
        assign_folds(["a", "b"], 1)
    with pytest.raises(ConfigError, match="at least 3 training slides"):
        assign_folds(["a", "b"], 3)


def test_subset_prepared_and_assemble(prepared_dataset, tmp_path):
    from monai_wsi_ext.prep.prepare import load_prepared_slides

    src = Path(prepared_dataset[0])
    slides = load_prepared_slides(src)
    keep = [slides[0].slide_id]
    out = subset_prepared(src, tmp_path / "sub", keep)
    assert [m.slide_id for m in load_prepared_slides(out)] == keep
    datalist = json.loads((out / "datalist.json").read_text())
    items = [i for split in datalist.values() for i in split]
    assert items and {i["slide_id"] for i in items} == set(keep)
    with pytest.raises(ConfigError, match="not prepared"):
        subset_prepared(src, tmp_path / "bad", ["no_such_slide"])
    feats = tmp_path / "f1"
    feats.mkdir()
    np.savez(feats / "a.npz", x=np.arange(3))
    got = assemble_features(tmp_path / "all", {"a": feats})
    assert np.array_equal(np.load(got / "a.npz")["x"], np.arange(3))
    with pytest.raises(ConfigError, match="b.npz does not exist"):
        assemble_features(tmp_path / "all2", {"b": feats})


@pytest.fixture(scope="module")
def oof_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oof")
    preset = json.loads((REPO / "configs" / "experiments" / "quick.json").read_text())
    preset["methods"] = ["classifier", "separate"]
    preset["canvas"]["out_of_fold"] = 2
    (root / "preset.json").write_text(json.dumps(preset))
    out = root / "run"
    proc = subprocess.run([sys.executable, "scripts/run_experiment.py", "run", "--preset", str(root / "preset.json"),
                           "--output_dir", str(out), "--threads", "1"],
                          cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_out_of_fold_canvas_features(oof_run):
    from monai_wsi_ext.prep.prepare import load_prepared_slides

    sd = oof_run / "seed_0"
    train = [m.slide_id for m in load_prepared_slides(oof_run / "prepared", "training")]
    val = [m.slide_id for m in load_prepared_slides(oof_run / "prepared", "validation")]
    assert len(train) == 2 and val
    oof = sd / "bundle" / "features_oof"
    assert sorted(p.stem for p in oof.glob("*.npz")) == sorted(train + val)
    for i, fold in enumerate(assign_folds(train, 2)):
        # the fold's encoder trained on the other training slides (and the validation slides), never on the fold
        datalist = json.loads((sd / f"oof_{i}" / "prepared_train" / "datalist.json").read_text())
        seen = {item["slide_id"] for item in datalist["training"]}
        assert seen == set(train) - set(fold)
        for sid in fold:
            used = np.load(oof / f"{sid}.npz")
            mine = np.load(sd / f"oof_{i}" / "features" / f"{sid}.npz")
            full = np.load(sd / "bundle" / "features" / f"{sid}.npz")
            assert np.array_equal(used["features"], mine["features"])
            assert not np.allclose(used["features"], full["features"])  # another encoder's features
            assert np.array_equal(used["labels"], full["labels"])
    for sid in val:
        assert np.array_equal(np.load(oof / f"{sid}.npz")["features"],
                              np.load(sd / "bundle" / "features" / f"{sid}.npz")["features"])
    # the U-Net was trained (and the separate heatmaps made) with these features
    assert (sd / "models" / "unet.pt").is_file()
    assert any((sd / "heatmaps" / "separate").iterdir())
