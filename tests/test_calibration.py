"""Threshold and Platt calibration chosen on validation heatmaps (issue 11: "threshold chosen on validation vs 0.5
and probability calibration"): monai_wsi_ext.evaluation.calibration and bundle/configs/calibrate.json, with the
threshold reaching evaluate.json and inference.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser, ConfigWorkflow
from sklearn.linear_model import LogisticRegression

from monai_wsi_ext.errors import MonaiWsiExtError
from monai_wsi_ext.evaluation import calibration as C
from monai_wsi_ext.evaluation import metrics as M
from monai_wsi_ext.evaluation.report import evaluate_heatmaps

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
T, N, U, B = M.LABEL_TUMOR, M.LABEL_NORMAL, M.LABEL_NOLABEL, M.LABEL_BACKGROUND


def _scores(n: int = 600, seed: int = 0, shift: float = -2.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.0, n) + 2.5 * y + shift)))
    return p, y


@pytest.mark.parametrize("criterion", C.CRITERIA)
def test_threshold_is_the_best_cut_by_brute_force(criterion):
    p, y = _scores()
    t = C.choose_threshold(p, y, criterion)

    def score(cut):
        call = p > cut
        if criterion == "accuracy":
            return np.mean(call == (y == 1))
        return 0.5 * (call[y == 1].mean() + (~call[y == 0]).mean())

    cands = np.concatenate([[-1.0], p, [2.0]])
    best = max(score(c) for c in cands)
    assert score(t) == pytest.approx(best, abs=1e-12)
    # these scores are biased low (shift -2): the best accuracy cut is well below 0.5 and beats 0.5
    assert t < 0.4 and score(t) > score(0.5)


def test_ties_keep_the_cut_nearest_one_half():
    # perfectly separated: every cut between 0.2 and 0.8 is right; 0.5 is among them and is kept
    p = np.array([0.1, 0.2, 0.8, 0.9])
    y = np.array([0, 0, 1, 1])
    assert C.choose_threshold(p, y) == pytest.approx(0.5)
    # the tumor patch with the lowest score is the only one above the cut at its own value
    assert C.choose_threshold(np.array([0.1, 0.3, 0.35, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.325)


def test_platt_matches_logistic_regression_and_lowers_ece():
    p, y = _scores(2000, seed=1)
    a, b = C.fit_platt(p, y)
    ref = LogisticRegression(C=1e9, max_iter=1000).fit(C._logit(p)[:, None], y)
    assert a == pytest.approx(float(ref.coef_[0, 0]), rel=1e-3)
    assert b == pytest.approx(float(ref.intercept_[0]), rel=1e-3, abs=1e-3)
    q = C.apply_platt(p, a, b)
    assert C.expected_calibration_error(q, y) < 0.5 * C.expected_calibration_error(p, y)
    assert np.isnan(C.apply_platt(np.array([np.nan, 0.5]), a, b)[0])


def test_one_class_or_bad_labels_are_errors_naming_the_data():
    with pytest.raises(MonaiWsiExtError, match="tumor and normal"):
        C.choose_threshold([0.1, 0.9], [0, 0], where="heatmap_dir 'val'")
    with pytest.raises(MonaiWsiExtError, match="labels must be"):
        C.choose_threshold([0.1, 0.9], [0, -1])
    with pytest.raises(MonaiWsiExtError, match="finite"):
        C.fit_platt([np.nan, 0.9], [0, 1])
    with pytest.raises(Exception, match="criterion"):
        C.choose_threshold([0.1, 0.9], [0, 1], criterion="f1")


def _write_slide(root: Path, sid: str, probs: np.ndarray, labels: np.ndarray) -> None:
    d = root / sid
    d.mkdir(parents=True)
    np.save(d / f"{sid}_prob.npy", probs.astype(np.float32))
    np.save(d / f"{sid}_labels.npy", labels.astype(np.int64))
    (d / f"{sid}_record.json").write_text(json.dumps({"slide_id": sid, "cell_size": 256, "mpp": 0.5}))


def _folder(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(2):
        labels = np.full((12, 12), N)
        labels[2:7, 2:7] = T
        labels[7, 2:7] = U
        labels[:, 11] = B
        p = np.clip(np.where(labels == T, 0.35, 0.1) + rng.normal(0, 0.08, labels.shape), 0, 1)
        p[labels == B] = np.nan
        _write_slide(root, f"s{i}", p, labels)
    return root


def _run(configs, **overrides):
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json")] + [str(CONFIGS / c) for c in configs],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                        workflow_type=None, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def test_calibrate_config_and_evaluate_with_it(tmp_path):
    val = _folder(tmp_path / "val", 0)
    test = _folder(tmp_path / "test", 1)
    _run(["calibrate.json"], heatmap_dir=str(val))
    record = json.loads((val / C.CALIBRATION_FILE).read_text())
    # nolabel and background cells are not used: 2 slides x (144 - 12 background - 5 nolabel = 25 tumor + 102 normal)
    assert (record["n_patches"], record["n_tumor"], record["slides"]) == (254, 50, ["s0", "s1"])
    assert record["threshold"] < 0.35 and record["accuracy_at_threshold"] > record["accuracy_at_0.5"]
    assert record["ece_platt"] < record["ece"]
    _run(["evaluate.json"], heatmap_dir=str(test), metrics_dir=str(tmp_path / "m"),
         calibration=str(val / C.CALIBRATION_FILE))
    overall = json.loads((tmp_path / "m" / "metrics_overall.json").read_text())
    expected = evaluate_heatmaps(test, threshold=record["threshold"], write=False)["overall"]
    assert overall["threshold"] == pytest.approx(record["threshold"])
    assert overall["pooled_accuracy"] == pytest.approx(expected["pooled_accuracy"])
    at_half = evaluate_heatmaps(test, write=False)["overall"]
    assert overall["pooled_accuracy"] > at_half["pooled_accuracy"]


def test_inference_config_takes_the_calibrated_threshold(tmp_path):
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"threshold": 0.3}))
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")])
    parser["calibration"] = str(cal)
    assert parser.get_parsed_content("operating_threshold") == pytest.approx(0.3)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")])
    assert parser.get_parsed_content("operating_threshold") == pytest.approx(0.5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"criterion": "accuracy"}))
    with pytest.raises(MonaiWsiExtError, match="bad.json.*threshold"):
        C.threshold_of(0.5, bad)
    with pytest.raises(MonaiWsiExtError, match="does not exist"):
        C.threshold_of(0.5, tmp_path / "missing.json")
