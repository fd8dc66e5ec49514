"""The whole demo on generated slides: slides -> patch grids -> encoder -> feature canvases -> U-Net -> heatmaps.

Every stage after the data preparation is the bundle's own config run through ``monai.bundle.run`` with the demo
overlay ``configs/datasets/demo.json``, i.e. exactly what ``bundle/docs/README.md`` lists as commands. The demo's
training schedules are the overlay's ``encoder_schedule`` and ``canvas_schedule``, passed as the overrides of
``train_encoder.json`` and ``train_canvas.json``; this script holds no schedule of its own.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
COMMON = str(REPO / "bundle/configs/common.json")
DEMO = str(REPO / "configs/datasets/demo.json")


def _schedule(name: str) -> dict:
    """The demo overlay's training schedule ``name`` (``encoder_schedule``, ``canvas_schedule``): the overrides
    (``max_epochs``, ``batch_size``, ``learning_rate``...) of the stage config it belongs to."""
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_files([DEMO])[name])


def _given(**options) -> dict:
    """The options given on the command line (not None)."""
    return {k: v for k, v in options.items() if v is not None}


def _bundle(config: str, **overrides) -> None:
    from monai.bundle import run as bundle_run

    bundle_run(config_file=[COMMON, str(REPO / f"bundle/configs/{config}"), DEMO],
               meta_file=str(REPO / "bundle/configs/metadata.json"),
               logging_file=str(REPO / "bundle/configs/logging.conf"),
               **overrides)


def _score(heatmap_dir: Path) -> dict:
    from monai_wsi_ext.evaluation.metrics import count_tumor_points, patch_metrics
    from monai_wsi_ext.labels import LABEL_BACKGROUND

    probs, labels, points = [], [], 0
    for d in sorted(p for p in heatmap_dir.iterdir() if p.is_dir() and p.name != "prepared"):
        prob = np.load(d / f"{d.name}_prob.npy")
        lab = np.load(d / f"{d.name}_labels.npy")
        tissue = lab != LABEL_BACKGROUND
        probs.append(prob[tissue])
        labels.append(lab[tissue])
        points += count_tumor_points(np.nan_to_num(prob, nan=0.0), lab)
    m = patch_metrics(np.concatenate(probs), np.concatenate(labels))
    m["tumor_points"] = points
    return m


def run(output_dir: str = "demo_output", n_train: int = 6, n_val: int = 2, n_test: int = 2, size: int = 3072,
        seed: int = 0, encoder_epochs: int | None = None, canvas_epochs: int | None = None, e2e_epochs: int = 0,
        encoder_lr: float | None = None, backbone: str = "googlenet") -> dict:
    """Run the demo end to end and print where the heatmaps are and how well they score.

    The demo uses 64 px patches at level 0 (center-cropped/augmented to 56 px) on 3072 px slides, instead of the
    paper's 256/224 px patches, so that it trains in minutes on 2 CPU cores; the canvas is 64 x 64 cells.

    Args:
        output_dir: everything goes here (slides, prepared grids, checkpoints, heatmaps).
        n_train: training slides.
        n_val: validation slides.
        n_test: held-out test slides (heatmaps and metrics).
        size: side of each generated slide in level-0 pixels.
        seed: seed of the slide generator and of training.
        encoder_epochs: patch-encoder epochs (default: the overlay's ``encoder_schedule#max_epochs``).
        canvas_epochs: canvas U-Net epochs (default: the overlay's ``canvas_schedule#max_epochs``).
        e2e_epochs: end-to-end epochs after separate training (0 skips; slow on CPU).
        encoder_lr: Adam learning rate of the encoder (default: the overlay's ``encoder_schedule#learning_rate``;
            the paper's 1e-4 needs more epochs than a demo has).
        backbone: ``googlenet`` or ``densenet121``.
    """
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset
    from monai_wsi_ext.utils import setup_logging

    setup_logging("INFO")
    out = Path(output_dir).resolve()
    t0 = time.perf_counter()
    timings = {}
    manifest = generate_dataset(out / "data", n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, width=size,
                                height=size, patch_size=64)
    timings["generate slides"] = time.perf_counter() - t0
    t = time.perf_counter()
    summary = prepare_dataset(collect_inputs(manifest=manifest), out / "prepared",
                              PrepareConfig(patch_size=64, thumbnail_max_size=1024))
    if summary["failed"]:
        print(f"preparation failed for {summary['failed']}", file=sys.stderr)
        return {"failed": summary["failed"]}
    timings["prepare"] = time.perf_counter() - t
    common = {"dataset_dir": str(out / "prepared"), "output_dir": str(out / "bundle"), "ckpt_dir": str(out / "models"),
              "seed": seed, "backbone": backbone}
    t = time.perf_counter()
    _bundle("train_encoder.json", **{**_schedule("encoder_schedule"),
                                     **_given(max_epochs=encoder_epochs, learning_rate=encoder_lr)}, **common)
    timings["train encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    _bundle("extract_features.json", **common)
    timings["extract features"] = time.perf_counter() - t
    t = time.perf_counter()
    _bundle("train_canvas.json", **{**_schedule("canvas_schedule"), **_given(max_epochs=canvas_epochs)}, **common)
    timings["train canvas U-Net"] = time.perf_counter() - t
    results = {}
    t = time.perf_counter()
    _bundle("inference.json", mode="classifier", heatmap_dir=str(out / "heatmaps_classifier"), **common)
    _bundle("inference.json", mode="canvas", heatmap_dir=str(out / "heatmaps"), **common)
    timings["inference"] = time.perf_counter() - t
    results["classifier only"] = _score(out / "heatmaps_classifier")
    results["canvas U-Net (separate)"] = _score(out / "heatmaps")
    if e2e_epochs > 0:
        t = time.perf_counter()
        _bundle("train_e2e.json", max_epochs=e2e_epochs, **common)
        _bundle("inference.json", mode="canvas", heatmap_dir=str(out / "heatmaps_e2e"),
                encoder_ckpt=str(out / "models/encoder_e2e.pt"), unet_ckpt=str(out / "models/unet_e2e.pt"), **common)
        timings["end-to-end"] = time.perf_counter() - t
        results["canvas U-Net (end-to-end)"] = _score(out / "heatmaps_e2e")
    total = time.perf_counter() - t0
    print("\n== monai-wsi-canvas demo: held-out test slides ==")
    print(f"{'method':28s} {'accuracy':>9s} {'PR-AUC':>7s} {'ROC-AUC':>8s} {'tumor points':>13s}")
    for name, m in results.items():
        print(f"{name:28s} {m['accuracy']:9.3f} {m['pr_auc']:7.3f} {m['roc_auc']:8.3f} {m['tumor_points']:13d}")
    print(f"(patches: {results['canvas U-Net (separate)']['n']}, "
          f"tumor {results['canvas U-Net (separate)']['n_tumor']})")
    print("\nstage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s")
    print(f"heatmaps, overlays and GeoJSON: {out / 'heatmaps'}/<slide_id>/")
    print(f"checkpoints: {out / 'models'}")
    report = {"results": results, "timings_s": timings, "total_s": total, "output_dir": str(out)}
    (out / "demo_results.json").write_text(json.dumps(report, indent=2, default=float))
    return report


@functools.wraps(run)
def _cli_run(*args, **kwargs) -> None:
    run(*args, **kwargs)  # the report is printed and saved; returning it would make fire print it again


if __name__ == "__main__":
    fire.Fire({"run": _cli_run})
