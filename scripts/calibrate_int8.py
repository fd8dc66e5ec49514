"""Calibrate an int8 encoder on tissue patches of your own prepared slides and report its agreement with fp32.

Needs the ``onnx`` extra (``pip install monai-wsi-canvas[onnx]``) and an ONNX model folder from
``scripts/export_bundle.py``. Example (the demo)::

    python scripts/export_bundle.py main demo_output/models --config_file configs/datasets/demo.json
    python scripts/calibrate_int8.py main demo_output/models demo_output/prepared --n_patches 64

writes ``demo_output/models/encoder.int8.onnx`` and ``encoder.int8.calibration.json``; run with it through
``--precision int8 --int8_encoder demo_output/models/encoder.int8.onnx --runtime onnxruntime`` (bundle configs) or
``precision="int8"`` (``monai_wsi_ext.deploy``). See bundle/docs/runtimes.md.
"""

from __future__ import annotations

import logging

import fire

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(model_dir: str, prepared_dir: str, calibration_split: str = "training", heldout_split: str = "validation",
         n_patches: int = 64, threshold: float = 0.5, method: str = "minmax", seed: int = 0, batch_size: int = 16,
         suffix: str = "", backend: str = "auto", runtime: str = "onnxruntime") -> dict:
    """Static int8 (QDQ) quantisation of ``<model_dir>/encoder{suffix}.onnx`` calibrated on ``n_patches`` tissue
    patches of the ``calibration_split`` slides of ``prepared_dir``; the report compares int8 with fp32 (same
    U-Net, ``unet{suffix}.onnx``) on the ``heldout_split`` slides: max/mean absolute change of the tumor probability,
    fraction of patches whose call at ``threshold`` changes, PR-AUC of both against the patch labels.

    Args:
        model_dir: the exported fp32 models (``scripts/export_bundle.py``); the int8 model and its report go here.
        prepared_dir: a ``scripts/prepare_dataset.py`` output holding your slides.
        calibration_split: split(s) that give the calibration patches.
        heldout_split: split(s) the report is measured on (disjoint from the calibration slides).
        n_patches: calibration patches, drawn uniformly from the calibration slides' tissue cells.
        threshold: tumor threshold of the compared calls.
        method: ``minmax``, ``entropy`` or ``percentile``.
        seed: patch draw seed.
        batch_size: encoder batch.
        suffix: ``""`` (separate training) or ``"_e2e"``.
        backend: slide reader backend.
        runtime: the runtime that measures the report (``onnxruntime`` or ``openvino``).

    Returns:
        The report's headline numbers (the full report is in the JSON file).
    """
    from monai_wsi_ext.runtime.int8 import calibrate_int8, report_path
    from monai_wsi_ext.utils import setup_logging

    setup_logging("INFO")
    report = calibrate_int8(model_dir, prepared_dir, str(calibration_split), str(heldout_split), int(n_patches),
                            float(threshold), method, int(seed), int(batch_size), str(suffix), backend, runtime)
    keys = ("model", "max_abs_prob_change", "mean_abs_prob_change", "fraction_calls_changed", "calls_changed",
            "pr_auc_fp32", "pr_auc_int8", "pr_auc_change", "heldout")
    out = {k: report[k] for k in keys}
    out["report"] = str(report_path(f"{model_dir}/{report['model']}"))
    return out


if __name__ == "__main__":
    fire.Fire({"main": main})
