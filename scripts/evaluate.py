"""Evaluate a heatmap folder (any model or baseline) from the command line; the same as ``evaluate.json``.

Example:
    python scripts/evaluate.py --heatmap_dir bundle/eval/heatmaps --truth camelyon16 --mpp 0.243 \\
        --missing_truth negative
"""

from __future__ import annotations

import json

import fire

__all__ = ["main"]


def main(heatmap_dir: str, output_dir: str | None = None, truth: str | None = None, threshold: float = 0.5,
         mpp: float | None = None, mask_downsample: float = 32.0, missing_truth: str = "skip",
         froc_candidates: str = "components", reference_stages: str | None = None, on_incomplete: str = "skip",
         log_level: str = "INFO") -> None:
    """Write ``metrics_per_slide.csv/json`` and ``metrics_overall.json`` and print the overall numbers.

    Args:
        heatmap_dir: folder of ``<slide_id>/<slide_id>_prob.npy`` (+ ``_labels.npy``, ``_record.json``).
        output_dir: where the metrics go (default: ``heatmap_dir``).
        truth: ground-truth folder or synthetic ``manifest.json`` (lesion FROC, slide classes from masks).
        threshold: tumor where ``prob > threshold``.
        mpp: level-0 µm/px for slides whose record has none (Camelyon16: 0.243).
        mask_downsample: level-0 px per truth-mask pixel (Camelyon16's evaluation level 5: 32).
        missing_truth: ``skip`` or ``negative`` (slides without a truth file count as tumor-free).
        froc_candidates: ``components`` or ``nms``.
        reference_stages: Camelyon17 reference pN-stage CSV.
        on_incomplete: ``skip`` (slide folders without a complete record are left out, listed in
            ``metrics_overall.json`` under ``incomplete_slides`` and counted in the printout) or ``error``.
        log_level: logging level.
    """
    from monai_wsi_ext.evaluation.report import evaluate_heatmaps
    from monai_wsi_ext.utils import setup_logging

    setup_logging(log_level)

    result = evaluate_heatmaps(heatmap_dir, output_dir, truth=truth, threshold=threshold, mpp=mpp,
                               mask_downsample=mask_downsample, missing_truth=missing_truth,
                               froc_candidates=froc_candidates, reference_stages=reference_stages,
                               on_incomplete=on_incomplete)
    keys = ("n_slides", "pooled_n", "pooled_accuracy", "pooled_pr_auc", "pooled_roc_auc", "mean_dice",
            "total_tumor_points", "slide_auc", "froc", "kappa")
    print(json.dumps({k: result["overall"].get(k) for k in keys}, indent=1))
    incomplete = result["overall"].get("incomplete_slides") or {}
    if incomplete:
        print(f"{len(incomplete)} incomplete slide folder(s) left out: "
              + ", ".join(f"{k} ({v})" for k, v in sorted(incomplete.items())))
    print("\n".join(f"{k}: {v}" for k, v in result["files"].items()))


if __name__ == "__main__":
    fire.Fire(main)
