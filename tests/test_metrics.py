"""Tests of monai_wsi_ext.evaluation.metrics: hand-computed values on small arrays, scikit-learn where it overlaps."""

from __future__ import annotations

import json
import math
import tempfile
import unittest
import warnings
from pathlib import Path

import numpy as np
from parameterized import parameterized
from sklearn.metrics import accuracy_score, average_precision_score, cohen_kappa_score, roc_auc_score

from monai_wsi_ext.evaluation.metrics import (
    LABEL_BACKGROUND,
    LABEL_NOLABEL,
    LABEL_NORMAL,
    LABEL_TUMOR,
    PATCHES_KEY,
    PN_STAGE_ORDER,
    count_tumor_points,
    dice,
    evaluate_slide,
    heatmap_candidates,
    largest_tumor_diameter_um,
    lesion_froc,
    patch_metrics,
    pn_stage,
    quadratic_kappa,
    slide_auc,
    slide_class,
    slide_class_from_mask,
    summarize,
)

LOGGER = "monai_wsi_ext.evaluation.metrics"


class TestPatchMetrics(unittest.TestCase):
    def test_hand_values(self):
        probs = [0.9, 0.2, 0.6, 0.4, 0.7, 0.1]
        labels = [1, 0, 0, 1, -1, -2]
        out = patch_metrics(probs, labels)
        # kept (0.9,T) (0.2,N) (0.6,N) (0.4,T); predictions T N T N -> 2 of 4 right
        self.assertEqual(out["accuracy"], 0.5)
        self.assertEqual(out["n_correct"], 2)
        # tumor/normal pairs ranked right: 0.9>0.2, 0.9>0.6, 0.4>0.2, not 0.4>0.6 -> 3/4
        self.assertAlmostEqual(out["roc_auc"], 0.75)
        # ranking T N T N: precision 1 at recall 1/2, 2/3 at recall 1 -> AP = 0.5 + 0.5 * 2/3
        self.assertAlmostEqual(out["pr_auc"], 5 / 6)
        self.assertEqual((out["n"], out["n_tumor"], out["n_normal"]), (4, 2, 2))

    def test_matches_sklearn_and_excludes_nolabel(self):
        rng = np.random.default_rng(0)
        labels = rng.choice([1, 0, -1, -2], size=(12, 10), p=[0.3, 0.4, 0.2, 0.1])
        probs = np.clip(0.5 * (labels == 1) + rng.normal(0.3, 0.25, labels.shape), 0, 1)
        out = patch_metrics(probs, labels)
        keep = labels >= 0
        y, p = labels[keep], probs[keep]
        self.assertAlmostEqual(out["accuracy"], accuracy_score(y, p > 0.5))
        self.assertAlmostEqual(out["pr_auc"], average_precision_score(y, p))
        self.assertAlmostEqual(out["roc_auc"], roc_auc_score(y, p))
        self.assertEqual(out["n"], int(keep.sum()))
        # any probability on nolabel/background cells changes nothing
        other = probs.copy()
        other[labels < 0] = rng.random(int((labels < 0).sum()))
        self.assertEqual(patch_metrics(other, labels), out)

    def test_threshold_is_strict(self):
        out = patch_metrics([0.5, 0.5], [0, 1])
        self.assertEqual(out["accuracy"], 0.5)  # 0.5 is predicted normal
        self.assertEqual(patch_metrics([0.5, 0.5], [0, 1], threshold=0.4)["accuracy"], 0.5)
        self.assertEqual(patch_metrics([0.3, 0.6], [0, 1], threshold=0.4)["accuracy"], 1.0)

    def test_one_class_gives_nan_aucs_with_warning(self):
        with self.assertLogs(LOGGER, level="WARNING") as logs:
            out = patch_metrics([0.2, 0.7, 0.9], [0, 0, -1])
        self.assertIn("undefined", "\n".join(logs.output))
        self.assertEqual(out["accuracy"], 0.5)
        self.assertTrue(math.isnan(out["pr_auc"]) and math.isnan(out["roc_auc"]))
        with self.assertLogs(LOGGER, level="WARNING"):
            empty = patch_metrics([0.2], [-1])
        self.assertEqual(empty["n"], 0)
        self.assertTrue(math.isnan(empty["accuracy"]))

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "same shape"):
            patch_metrics([0.1, 0.2], [1])
        with self.assertRaisesRegex(ValueError, "labels"):
            patch_metrics([0.1, 0.2], [1, 255])
        with self.assertRaisesRegex(ValueError, "non-finite"):
            patch_metrics([np.nan, 0.2], [1, 0])


class TestSlideAuc(unittest.TestCase):
    def test_hand_value_and_sklearn(self):
        scores, labels = [0.9, 0.3, 0.6, 0.2], [1, 0, 0, 1]
        # pairs: 0.9 beats both normals, 0.2 beats neither -> 2/4
        self.assertAlmostEqual(slide_auc(scores, labels), 0.5)
        rng = np.random.default_rng(1)
        s, y = rng.random(15), np.r_[np.ones(7), np.zeros(8)].astype(int)
        self.assertAlmostEqual(slide_auc(s, y), roc_auc_score(y, s))

    def test_one_class_nan(self):
        with self.assertLogs(LOGGER, level="WARNING"):
            self.assertTrue(math.isnan(slide_auc([0.2, 0.4], [1, 1])))


# FROC geometry: 16x16 grid of 256-px cells at 0.5 µm/px (128 µm cells); mask at downsample 32 (16 µm/px),
# 8 mask pixels per cell. Three 3x3-cell lesions (384 µm), well above the ITC limit and far apart.
LESIONS = [(1, 1), (1, 10), (10, 5)]


def _froc_mask(cell_px: int = 8, grid: int = 16) -> np.ndarray:
    mask = np.zeros((grid * cell_px, grid * cell_px), np.uint8)
    for r, c in LESIONS:
        mask[r * cell_px : (r + 3) * cell_px, c * cell_px : (c + 3) * cell_px] = 1
    return mask


def _perfect_map(grid: int = 16) -> np.ndarray:
    prob = np.zeros((grid, grid))
    for r, c in LESIONS:
        prob[r : r + 3, c : c + 3] = 1.0
    return prob


def _sample(prob_map, mask=None, **kw):
    sample = {"prob_map": prob_map, "cell_size": 256, "tumor_mask": _froc_mask() if mask is None else mask}
    sample.update({"mask_downsample": 32, "mpp": 0.5})
    sample.update(kw)
    return sample


def _two_hits_one_fp(fp_prob: float) -> np.ndarray:
    prob = np.zeros((16, 16))
    prob[2, 2] = 0.9  # inside lesion 1
    prob[2, 11] = 0.8  # inside lesion 2; lesion 3 is missed
    prob[13, 13] = fp_prob  # normal tissue
    return prob


class TestLesionFroc(unittest.TestCase):
    @parameterized.expand(
        [
            # fp below both hits: 2/3 sensitivity from 0 FP on
            ("fp_lowest", 0.7, 2 / 3, [2 / 3] * 6),
            # fp between the hits: 1/3 below 1 FP/slide, 2/3 from 1 FP/slide -> (2 * 1/3 + 4 * 2/3) / 6
            ("fp_middle", 0.85, 5 / 9, [1 / 3, 1 / 3] + [2 / 3] * 4),
            # fp above both hits: nothing below 1 FP/slide -> 4 * 2/3 / 6
            ("fp_highest", 0.95, 4 / 9, [0, 0] + [2 / 3] * 4),
        ]
    )
    def test_two_of_three_lesions_and_one_fp(self, _, fp_prob, froc, sens):
        out = lesion_froc([_sample(_two_hits_one_fp(fp_prob))])
        self.assertAlmostEqual(out["froc"], froc)
        np.testing.assert_allclose(list(out["sensitivity_at"].values()), sens)
        self.assertEqual((out["num_targets"], out["num_images"], out["num_candidates"]), (3, 1, 3))
        self.assertEqual(list(out["sensitivity_at"]), ["0.25", "0.5", "1.0", "2.0", "4.0", "8.0"])

    def test_curve_hand_values(self):
        out = lesion_froc([_sample(_two_hits_one_fp(0.85))])
        # thresholds 0.8, 0.85, 0.9, then above all
        np.testing.assert_allclose(out["fps_per_image"], [1, 1, 0, 0])
        np.testing.assert_allclose(out["sensitivity"], [2 / 3, 1 / 3, 1 / 3, 0])

    def test_fps_are_per_slide(self):
        normal = _sample(np.zeros((16, 16)), mask=np.zeros((128, 128), np.uint8))
        normal["prob_map"][5, 5] = 0.95
        out = lesion_froc([_sample(_two_hits_one_fp(0.85)), normal])
        self.assertEqual(out["num_images"], 2)
        # thresholds 0.8, 0.85, 0.9, 0.95: FPs 2, 2, 1, 1 over two slides
        np.testing.assert_allclose(out["fps_per_image"], [1, 1, 0.5, 0.5, 0])
        np.testing.assert_allclose(out["sensitivity"], [2 / 3, 1 / 3, 1 / 3, 0, 0])
        self.assertAlmostEqual(out["sensitivity_at"]["0.25"], 0.0)
        self.assertAlmostEqual(out["sensitivity_at"]["8.0"], 2 / 3)

    @parameterized.expand(
        [
            ("components_pow2", "components", 256, 32),
            ("nms_pow2", "nms", 256, 32),
            ("components_any_sizes", "components", 300, 25),  # 12 mask px per cell
        ]
    )
    def test_perfect_heatmap_scores_one(self, _, mode, cell_size, downsample):
        cell_px = cell_size // downsample
        sample = _sample(_perfect_map(), mask=_froc_mask(cell_px), cell_size=cell_size, mask_downsample=downsample)
        out = lesion_froc([sample], candidates=mode)
        self.assertEqual(out["froc"], 1.0)
        self.assertEqual(out["num_targets"], 3)

    def test_candidates_components_vs_nms(self):
        probs, x, y = heatmap_candidates(_perfect_map(), cell_size=256)
        self.assertEqual(len(probs), 3)  # one point per connected region
        # each point is the centre of the first most probable cell of its region
        self.assertEqual(sorted(zip(x.tolist(), y.tolist())), [(384.0, 384.0), (1408.0, 2688.0), (2688.0, 384.0)])
        # MONAI's ProbNMS clears [i - box // 2, i + box - box // 2) around each maximum, the first in raster order
        probs_nms, _, _ = heatmap_candidates(_perfect_map(), cell_size=256, mode="nms", nms_box_size=3)
        self.assertEqual(len(probs_nms), 12)  # a 3x3 box at a region's corner clears 2x2 cells: four points each
        probs_nms, _, _ = heatmap_candidates(_perfect_map(), cell_size=256, mode="nms", nms_box_size=5)
        self.assertEqual(len(probs_nms), 3)
        _, xo, yo = heatmap_candidates(_perfect_map(), cell_size=256, origin=(1000, 2000))
        np.testing.assert_allclose(np.sort(xo), np.sort(x) + 1000)
        np.testing.assert_allclose(np.sort(yo), np.sort(y) + 2000)
        with self.assertRaisesRegex(ValueError, "mode"):
            heatmap_candidates(_perfect_map(), cell_size=256, mode="peaks")

    def test_itc_excluded(self):
        mask = _froc_mask()
        mask[14 * 8 : 14 * 8 + 4, 1 * 8 : 1 * 8 + 4] = 1  # 64 µm spot: an isolated tumor cell cluster
        prob = _two_hits_one_fp(0.7)
        prob[14, 1] = 0.99  # a hit on the ITC is neither a TP nor a FP
        out = lesion_froc([_sample(prob, mask=mask)])
        self.assertEqual((out["num_targets"], out["num_itc"]), (3, 1))
        self.assertAlmostEqual(out["froc"], 2 / 3)

    def test_given_candidates(self):
        # level-0 points: one in lesion 1, one in normal tissue
        out = lesion_froc([_sample(None, candidates=([0.9, 0.6], [600.0, 3500.0], [600.0, 3500.0]))])
        self.assertAlmostEqual(out["froc"], 1 / 3)

    def test_no_target_is_nan(self):
        with self.assertLogs(LOGGER, level="WARNING"):
            out = lesion_froc([_sample(_two_hits_one_fp(0.7), mask=np.zeros((128, 128), np.uint8))])
        self.assertTrue(math.isnan(out["froc"]))

    def test_bad_samples(self):
        with self.assertRaisesRegex(ValueError, "empty"):
            lesion_froc([])
        no_mpp = {"prob_map": np.zeros((4, 4)), "cell_size": 1, "tumor_mask": np.zeros((4, 4)), "mask_downsample": 2}
        with self.assertRaisesRegex(ValueError, r"samples\[0\].*mpp"):
            lesion_froc([no_mpp])
        with self.assertRaisesRegex(ValueError, "mask_downsample"):
            lesion_froc([_sample(_perfect_map(), mask_downsample=0)])

    def test_matches_monai_lesion_froc_on_files(self):
        """Same map and mask at one level: our array composition equals MONAI's file-based LesionFROC."""
        from monai.apps.pathology.metrics import LesionFROC
        from monai.utils import optional_import

        _, has_openslide = optional_import("openslide")
        if not has_openslide:
            self.skipTest("openslide is not installed")
        import tifffile

        mask = np.zeros((128, 128), np.uint8)
        mask[8:40, 8:40] = 1
        mask[8:40, 80:112] = 1
        mask[80:112, 40:72] = 1
        prob = np.zeros((128, 128), np.float32)
        prob[20, 20], prob[30, 90], prob[120, 120], prob[2, 60] = 0.875, 0.75, 0.8125, 0.625  # lesion 3 missed
        with tempfile.TemporaryDirectory() as tmp:
            mask_path, prob_path = Path(tmp) / "mask.tif", Path(tmp) / "prob.npy"
            tifffile.imwrite(mask_path, np.repeat(mask[..., None], 3, -1), tile=(64, 64), photometric="rgb")
            np.save(prob_path, prob)
            data = [{"prob_map": str(prob_path), "tumor_mask": str(mask_path), "level": 0, "pixel_spacing": 8.0}]
            with warnings.catch_warnings():  # MONAI reads skimage's deprecated major_axis_length
                warnings.simplefilter("ignore", FutureWarning)
                expected = LesionFROC(data, nms_box_size=8, image_reader_name="OpenSlide").evaluate()
        ours = lesion_froc(
            [{"prob_map": prob, "cell_size": 1, "tumor_mask": mask, "mask_downsample": 1, "mpp": 8.0}],
            candidates="nms",
            nms_box_size=8,
        )
        self.assertAlmostEqual(ours["froc"], float(expected))
        self.assertAlmostEqual(ours["froc"], (2 * 1 / 3 + 4 * 2 / 3) / 6)


class TestSlideClass(unittest.TestCase):
    @parameterized.expand(
        [
            ("just_over_2mm", 20, 100.1, "macro"),
            ("just_under_2mm", 20, 99.9, "micro"),
            ("exactly_2mm", 20, 100.0, "micro"),
            ("just_over_0.2mm", 2, 100.1, "micro"),
            ("just_under_0.2mm", 2, 99.9, "itc"),
            ("single_cell", 1, 150.0, "itc"),
            ("long_run", 30, 100.0, "macro"),
        ]
    )
    def test_thresholds_in_microns(self, _, run, cell_um, expected):
        prob = np.zeros((5, 40))
        prob[2, 3 : 3 + run] = 0.9
        self.assertEqual(slide_class(prob, cell_um), expected)
        self.assertEqual(slide_class_from_mask(prob > 0.5, cell_um), expected)

    def test_negative_threshold_and_largest_region(self):
        prob = np.full((6, 30), 0.5)  # not above 0.5
        self.assertEqual(slide_class(prob, 100.0), "negative")
        self.assertEqual(slide_class(prob, 100.0, threshold=0.4), "macro")  # whole 30-cell-wide map
        prob = np.zeros((6, 30))
        prob[0, 0] = 0.9  # ITC-sized
        prob[4, 5:10] = 0.9  # 5 cells = 500 µm: the largest decides
        self.assertEqual(slide_class(prob, 100.0), "micro")
        self.assertEqual(slide_class_from_mask(np.zeros((3, 3), bool), 10.0), "negative")

    def test_diameter_convention(self):
        block = np.zeros((6, 6), bool)
        block[1:3, 1:3] = True
        self.assertAlmostEqual(largest_tumor_diameter_um(block, 10.0), 10.0 * math.sqrt(5))
        diagonal = np.eye(4, dtype=bool)  # one 8-connected region
        self.assertGreater(largest_tumor_diameter_um(diagonal, 1.0), 4.0)
        with self.assertRaisesRegex(ValueError, "label_grid == LABEL_TUMOR"):
            largest_tumor_diameter_um(np.array([[1, -1]]), 1.0)


class TestPNStage(unittest.TestCase):
    @parameterized.expand(
        [
            ("all_negative", ["negative"] * 5, "pN0"),
            ("empty", [], "pN0"),
            ("one_itc", ["itc", "negative", "negative", "negative", "negative"], "pN0(i+)"),
            ("only_itcs", ["itc"] * 5, "pN0(i+)"),
            ("one_micro", ["micro", "itc", "negative", "negative", "negative"], "pN1mi"),
            ("five_micro_no_macro", ["micro"] * 5, "pN1mi"),
            ("one_macro", ["macro", "negative", "negative", "negative", "negative"], "pN1"),
            ("macro_plus_two_micro", ["macro", "micro", "micro", "itc", "negative"], "pN1"),
            ("three_macro_itcs_do_not_count", ["macro", "macro", "macro", "itc", "itc"], "pN1"),
            ("macro_plus_three_micro", ["macro", "micro", "micro", "micro", "negative"], "pN2"),
            ("four_macro", ["macro", "macro", "macro", "macro", "negative"], "pN2"),
            ("all_macro", ["macro"] * 5, "pN2"),
            ("case_insensitive", ["Macro", "NEGATIVE", "negative", "negative", "negative"], "pN1"),
        ]
    )
    def test_rules(self, _, classes, expected):
        self.assertEqual(pn_stage(classes), expected)

    def test_unknown_class(self):
        with self.assertRaisesRegex(ValueError, r"slide_classes\[1\]"):
            pn_stage(["macro", "isolated"])


class TestKappa(unittest.TestCase):
    def test_perfect_agreement(self):
        stages = ["pN0", "pN1", "pN2", "pN0(i+)", "pN1mi"]
        self.assertEqual(quadratic_kappa(stages, stages), 1.0)

    def test_hand_case(self):
        # ordinal 0,1,2 vs 0,2,2: observed weighted disagreement 1, expected 15/3 = 5 -> 1 - 1/5
        self.assertAlmostEqual(quadratic_kappa(["pN0", "pN0(i+)", "pN1mi"], ["pN0", "pN1mi", "pN1mi"]), 0.8)

    def test_matches_sklearn(self):
        rng = np.random.default_rng(2)
        ref, pred = rng.integers(0, 5, 20), rng.integers(0, 5, 20)
        expected = cohen_kappa_score(ref, pred, weights="quadratic", labels=list(range(5)))
        got = quadratic_kappa([PN_STAGE_ORDER[i] for i in ref], [PN_STAGE_ORDER[i] for i in pred])
        self.assertAlmostEqual(got, expected)

    def test_undefined_and_errors(self):
        with self.assertLogs(LOGGER, level="WARNING"):
            self.assertTrue(math.isnan(quadratic_kappa(["pN0", "pN0"], ["pN0", "pN0"])))
        with self.assertRaisesRegex(ValueError, r"pred_stages\[0\]"):
            quadratic_kappa(["pN0"], ["pN3"])
        with self.assertRaisesRegex(ValueError, "same length"):
            quadratic_kappa(["pN0"], [])


N, T, X, B = LABEL_NORMAL, LABEL_TUMOR, LABEL_NOLABEL, LABEL_BACKGROUND


class TestTumorPoints(unittest.TestCase):
    # fmt: off
    LABELS = np.array([
        [N, N, N, N, N, N, N],
        [N, N, N, N, N, T, T],
        [N, N, N, N, N, T, T],
        [N, N, N, N, N, N, N],
        [N, N, N, X, N, N, B],
        [N, N, N, N, N, N, B],
    ])
    PRED = np.array([
        [1, 0, 0, 0, 0, 0, 0],  # spot 1 in normal
        [0, 0, 0, 0, 1, 1, 0],  # blob touching gt tumor
        [0, 0, 0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],  # spot 2: two diagonal cells, one 8-connected component
        [0, 0, 0, 1, 0, 0, 0],  # ... touching a nolabel cell -> not counted
        [1, 0, 0, 0, 0, 0, 0],  # spot 3 in normal
    ], dtype=float) * 0.9
    # fmt: on

    def test_hand_grid(self):
        # points: (0,0) and (5,0); the blob touches tumor; the diagonal pair touches nolabel
        self.assertEqual(count_tumor_points(self.PRED, self.LABELS), 2)
        labels = self.LABELS.copy()
        labels[4, 3] = N  # the diagonal pair now lies in normal tissue only
        self.assertEqual(count_tumor_points(self.PRED, labels), 3)
        self.assertEqual(count_tumor_points(self.PRED, labels, max_size=1), 2)  # the pair has 2 cells

    def test_background_ignored_and_threshold(self):
        pred = np.zeros((6, 7))
        pred[4:6, 5:7] = 0.8  # two normal cells and two background cells: one normal-only spot
        self.assertEqual(count_tumor_points(pred, self.LABELS), 1)
        self.assertEqual(count_tumor_points(pred, self.LABELS, threshold=0.8), 0)
        with self.assertRaisesRegex(ValueError, "same shape"):
            count_tumor_points(pred[:, :3], self.LABELS)


class TestDice(unittest.TestCase):
    def test_hand_values(self):
        prob = np.array([[0.9, 0.8, 0.1], [0.7, 0.2, 0.0]])
        gt = np.array([[1, 0, 0], [0, 1, 0]])
        self.assertAlmostEqual(dice(prob, gt), 2 * 1 / (3 + 2))
        valid = np.array([[1, 1, 1], [0, 0, 1]], bool)  # drops (1,0) prediction and (1,1) truth
        self.assertAlmostEqual(dice(prob, gt, valid=valid), 2 * 1 / (2 + 1))
        self.assertAlmostEqual(dice(prob, gt, threshold=0.85), 2 * 1 / (1 + 2))
        self.assertEqual(dice(prob, prob > 0.5), 1.0)
        self.assertEqual(dice(np.zeros((2, 2)), np.ones((2, 2))), 0.0)

    def test_empty_and_errors(self):
        self.assertTrue(math.isnan(dice(np.zeros((2, 2)), np.zeros((2, 2)))))
        with self.assertRaisesRegex(ValueError, "gt_tumor_grid"):
            dice(np.zeros((2, 2)), np.array([[1, -1], [0, -2]]))
        with self.assertRaisesRegex(ValueError, "same shape"):
            dice(np.zeros((2, 2)), np.zeros((2, 3)))


class TestEvaluateAndSummarize(unittest.TestCase):
    # fmt: off
    LABELS_A = np.array([
        [B, N, N, N],
        [N, T, T, N],
        [N, T, X, N],
        [N, N, N, B],
    ])
    PROBS_A = np.array([
        [0.99, 0.1, 0.6, 0.1],
        [0.2, 0.9, 0.7, 0.1],
        [0.1, 0.4, 0.8, 0.1],
        [0.1, 0.1, 0.1, 0.95],
    ])
    # fmt: on

    def test_evaluate_slide_hand_values(self):
        out = evaluate_slide(self.PROBS_A, self.LABELS_A, cell_size_um=100.0)
        # evaluated: 3 tumor (0.9, 0.7, 0.4), 10 normal, one normal above 0.5 (0.6) -> 11 of 13 right
        self.assertEqual((out["n"], out["n_tumor"], out["n_normal"]), (13, 3, 10))
        self.assertAlmostEqual(out["accuracy"], 11 / 13)
        # dice on tumor/normal cells: predicted {(0,2),(1,1),(1,2)}, truth {(1,1),(1,2),(2,1)} -> 2*2/6
        self.assertAlmostEqual(out["dice"], 2 / 3)
        self.assertEqual(out["tumor_points"], 0)  # (0,2) touches tumor (1,1)/(1,2)
        self.assertEqual(out["slide_score"], 0.9)  # background cells (0.99, 0.95) are not patches
        self.assertEqual(out["slide_label"], 1)
        self.assertEqual(out["pred_class"], "micro")  # cells (0,2),(1,1),(1,2),(2,2): diameter > 2 cells
        self.assertEqual(out["gt_class"], "micro")
        self.assertAlmostEqual(out["gt_diameter_um"], 100.0 * math.sqrt(5))
        self.assertEqual(sorted(out[PATCHES_KEY]["labels"]), [0] * 10 + [1] * 3)
        json.dumps(out)  # plain types only

    def test_summarize_pools_and_averages(self):
        labels_b = np.array([[N, N, N], [N, N, N]])
        probs_b = np.array([[0.1, 0.7, 0.1], [0.1, 0.1, 0.2]])
        a = evaluate_slide(self.PROBS_A, self.LABELS_A, cell_size_um=100.0)
        with self.assertLogs(LOGGER, level="WARNING"):  # slide b has one class: NaN AUCs
            b = evaluate_slide(probs_b, labels_b, cell_size_um=100.0)
        self.assertEqual(
            (b["tumor_points"], b["slide_label"], b["pred_class"], b["gt_class"]), (1, 0, "itc", "negative")
        )
        summary = summarize([a, b])
        keep = self.LABELS_A >= 0
        y = np.r_[self.LABELS_A[keep], labels_b.ravel()]
        p = np.r_[self.PROBS_A[keep], probs_b.ravel()]
        self.assertEqual(summary["n_slides"], 2)
        self.assertEqual(summary["pooled_n"], 19)
        self.assertAlmostEqual(summary["pooled_accuracy"], accuracy_score(y, p > 0.5))
        self.assertAlmostEqual(summary["pooled_pr_auc"], average_precision_score(y, p))
        self.assertAlmostEqual(summary["pooled_roc_auc"], roc_auc_score(y, p))
        self.assertAlmostEqual(summary["mean_accuracy"], (11 / 13 + 5 / 6) / 2)
        self.assertAlmostEqual(summary["mean_pr_auc"], a["pr_auc"])  # slide b's NaN is ignored
        self.assertAlmostEqual(summary["mean_tumor_points"], 0.5)
        self.assertEqual(summary["slide_auc"], 1.0)  # 0.9 (tumor slide) > 0.7 (normal slide)
        self.assertEqual(summary["slide_class_agreement"], 0.5)
        json.dumps(summary)
        # without the raw patches: accuracy from counts, AUCs NaN
        light = [{k: v for k, v in s.items() if k != PATCHES_KEY} for s in (a, b)]
        with self.assertLogs(LOGGER, level="WARNING"):
            summary_light = summarize(light)
        self.assertAlmostEqual(summary_light["pooled_accuracy"], summary["pooled_accuracy"])
        self.assertTrue(math.isnan(summary_light["pooled_pr_auc"]))


if __name__ == "__main__":
    unittest.main()


def test_slide_without_tissue_has_no_score_and_stays_out_of_the_slide_auc():
    """A no-tissue slide used to be scored a confident 0.0 (and counted as a correct normal slide in the AUC)."""
    from monai_wsi_ext.evaluation.metrics import LABEL_BACKGROUND, LABEL_NORMAL, LABEL_TUMOR, evaluate_slide, summarize

    empty = evaluate_slide(np.zeros((4, 4)), np.full((4, 4), LABEL_BACKGROUND), cell_size_um=128.0, slide_label=0)
    assert empty["slide_score"] is None and empty["status"] == "no_tissue"
    labels = np.full((4, 4), LABEL_NORMAL)
    labels[0, 0] = LABEL_TUMOR
    probs = np.full((4, 4), 0.2)
    probs[0, 0] = 0.9
    tumor = evaluate_slide(probs, labels, cell_size_um=128.0)
    normal = evaluate_slide(np.full((4, 4), 0.3), np.full((4, 4), LABEL_NORMAL), cell_size_um=128.0)
    assert tumor["status"] == normal["status"] == "ok"
    out = summarize([tumor, normal, empty])
    assert out["n_no_tissue"] == 1 and out["slide_auc"] == 1.0
