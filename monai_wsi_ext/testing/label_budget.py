"""Label-budget experiment (issue 13 item 2): how much each label-free pretraining helps when few patches are
labelled.

On generated slides (:func:`monai_wsi_ext.testing.synthetic.generate_dataset`, prepared once), for each encoder
start — ``random`` (fresh weights), ``autoencoder`` (``pretrain_encoder.json``) and ``simclr``
(``pretrain_encoder.json`` + ``pretrain_encoder_simclr.json``), both pretrained once on every tissue patch of the
training slides with labels ignored — and each label budget (``label_fraction``: the class-stratified share of the
labelled training patches ``train_encoder.json`` trains on), the encoder is trained with the same schedule, the
test slides get classifier-only heatmaps (``inference.json`` + ``baseline_classifier.json``) and, optionally, the
canvas U-Net on its features (``extract_features.json``, ``train_canvas.json``, ``inference.json``); every heatmap
folder is scored by ``evaluate.json``. Every stage is the bundle's own config.

``scripts/label_budget.py`` is the command; ``results.json`` / ``results.md`` in the output folder hold the table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import write_json_atomic, write_text_atomic

__all__ = ["INITS", "PRESETS", "run_label_budget", "markdown"]

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
INITS = ("random", "autoencoder", "simclr")

PRESETS: dict[str, dict[str, Any]] = {
    # what the docs table was measured with (see bundle/docs/encoders.md)
    "default": {"backbone": "googlenet", "n_train": 4, "n_val": 2, "n_test": 2, "size": 2048, "patch_size": 64,
                "crop_size": 56,
                "budgets": [0.01, 0.1, 1.0], "inits": list(INITS), "canvas": True, "canvas_size": 64,
                "encoder": {"max_epochs": 6, "batch_size": 32, "learning_rate": 1e-3, "samples_per_epoch": 512},
                "pretrain": {"max_epochs": 4, "batch_size": 64, "learning_rate": 1e-3, "samples_per_epoch": 2048,
                             "val_samples": 256},
                "canvas_schedule": {"max_epochs": 30, "batch_size": 4, "samples_per_slide": 4, "learning_rate": 1e-3}},
    # the test's smoke size: the numbers only show that each stage learns something
    "quick": {"backbone": "small_cnn", "n_train": 2, "n_val": 1, "n_test": 1, "size": 1024, "patch_size": 64,
              "crop_size": 56,
              "budgets": [0.1, 1.0], "inits": list(INITS), "canvas": False, "canvas_size": 32,
              "encoder": {"max_epochs": 4, "batch_size": 32, "learning_rate": 1e-3, "samples_per_epoch": 256},
              "pretrain": {"max_epochs": 1, "batch_size": 32, "learning_rate": 1e-3, "samples_per_epoch": 128,
                           "val_samples": 32},
              "canvas_schedule": {"max_epochs": 2, "batch_size": 2, "samples_per_slide": 2, "learning_rate": 1e-3}},
}

_METRICS = ("pooled_accuracy", "pooled_pr_auc", "pooled_roc_auc", "total_tumor_points")


def _bundle(configs: Sequence[str], **overrides: Any) -> None:
    from monai.bundle import run as bundle_run

    bundle_run(config_file=[str(CONFIGS / "common.json"), *[str(CONFIGS / c) for c in configs]],
               meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"), **overrides)


def run_label_budget(output_dir: str | Path, preset: str = "default", seed: int = 0, backbone: str | None = None,
                     budgets: Sequence[float] | None = None, inits: Sequence[str] | None = None,
                     canvas: bool | None = None, canvas_budget: bool = False) -> dict:
    """Run the experiment; returns (and writes to ``results.json``) ``{"settings", "rows", "timings_s"}``, one row
    per (init, budget, method) with the metrics of ``evaluate.json`` on the test slides.

    ``canvas_budget``: the canvas U-Net trains on the same label budget as the encoder (``canvas_label_fraction``
    = the budget, the encoder's patches: :func:`~monai_wsi_ext.data.features.budget_cells`) instead of every
    training label.

    Raises:
        ConfigError: an unknown preset or init, a budget outside (0, 1].
    """
    from monai_wsi_ext.data.patches import label_budget, load_datalist
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset

    if preset not in PRESETS:
        raise ConfigError(f"label-budget preset {preset!r} unknown; known: {sorted(PRESETS)}")
    cfg = json.loads(json.dumps(PRESETS[preset]))
    cfg["budgets"] = [float(b) for b in (budgets if budgets is not None else cfg["budgets"])]
    cfg["inits"] = list(inits if inits is not None else cfg["inits"])
    cfg["canvas"] = bool(cfg["canvas"] if canvas is None else canvas)
    cfg["canvas_label_budget"] = bool(canvas_budget)
    backbone = backbone or cfg.pop("backbone")
    cfg.pop("backbone", None)
    bad = [i for i in cfg["inits"] if i not in INITS]
    if bad:
        raise ConfigError(f"unknown encoder start(s) {bad}; known: {list(INITS)}")
    if any(not 0 < b <= 1 for b in cfg["budgets"]):
        raise ConfigError(f"label budgets must be in (0, 1], got {cfg['budgets']}")
    out = Path(output_dir).resolve()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        logger.info("label budget: %s", name)
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    manifest = timed("generate slides", generate_dataset, out / "data", n_train=cfg["n_train"], n_val=cfg["n_val"],
                     n_test=cfg["n_test"], seed=seed, width=cfg["size"], height=cfg["size"],
                     patch_size=cfg["patch_size"])
    prepared = out / "prepared"
    summary = timed("prepare", prepare_dataset, collect_inputs(manifest=manifest), prepared,
                    PrepareConfig(patch_size=cfg["patch_size"], thumbnail_max_size=1024), progress=False)
    if summary["failed"]:
        raise ConfigError(f"label budget: preparing the slides failed: {summary['failed']}")
    labelled = load_datalist(prepared / "datalist.json", "training")
    n_labelled = len(labelled)
    common = {"dataset_dir": str(prepared), "seed": int(seed), "backbone": backbone, "crop_size": cfg["crop_size"],
              "patch_size": cfg["patch_size"], "canvas_size": cfg["canvas_size"], "num_workers": 0}
    starts: dict[str, str | None] = {"random": None}
    for init in ("autoencoder", "simclr"):
        if init not in cfg["inits"]:
            continue
        ckpt = out / f"pretrain_{init}"
        overlay = ["pretrain_encoder.json"] + (["pretrain_encoder_simclr.json"] if init == "simclr" else [])
        timed(f"pretrain {init}", _bundle, overlay, **common, **cfg["pretrain"], ckpt_dir=str(ckpt),
              output_dir=str(ckpt / "bundle"))
        starts[init] = str(ckpt / "encoder_pretrained.pt")
    rows = []
    for init in cfg["inits"]:
        for budget in cfg["budgets"]:
            run = out / f"{init}_{budget:g}"
            used = len(label_budget(labelled, budget, seed=seed))  # the patches train_encoder.json draws
            stage = {**common, "ckpt_dir": str(run / "models"), "output_dir": str(run / "bundle")}
            timed(f"{init} {budget:g}: train encoder", _bundle, ["train_encoder.json"], **stage, **cfg["encoder"],
                  label_fraction=budget, pretrained_path=starts[init])
            methods = {"classifier": (["inference.json", "baseline_classifier.json"], {})}
            if cfg["canvas"]:
                timed(f"{init} {budget:g}: extract features", _bundle, ["extract_features.json"], **stage)
                timed(f"{init} {budget:g}: train canvas", _bundle, ["train_canvas.json"], **stage,
                      **cfg["canvas_schedule"], canvas_label_fraction=budget if canvas_budget else 1.0)
                methods["canvas"] = (["inference.json"], {"mode": "canvas"})
            for method, (configs, kw) in methods.items():
                folder = run / f"heatmaps_{method}"
                timed(f"{init} {budget:g}: {method} heatmaps", _bundle, configs, **stage, **kw,
                      heatmap_dir=str(folder), split="test")
                _bundle(["evaluate.json"], heatmap_dir=str(folder), truth_dir=str(manifest),
                        output_dir=str(run / "bundle"))
                metrics = json.loads((folder / "metrics_overall.json").read_text())
                rows.append({"init": init, "label_fraction": budget, "labelled_patches": used, "method": method,
                             **{k: metrics.get(k) for k in _METRICS}, "n_test_patches": metrics.get("pooled_n")})
    result = {"settings": {**cfg, "preset": preset, "seed": seed, "backbone": backbone,
                           "labelled_training_patches": n_labelled}, "rows": rows, "timings_s": timings}
    write_json_atomic(out / "results.json", result)
    write_text_atomic(out / "results.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    """The results as a markdown table (accuracy, PR-AUC, ROC-AUC in %, tumor points)."""
    s = result["settings"]
    lines = [f"Label budget: {s['n_train']} training slides ({s['labelled_training_patches']} labelled patches), "
             f"{s['n_test']} test slides, backbone {s['backbone']}, seed {s['seed']}, preset `{s['preset']}`; the "
             f"canvas U-Net trained on {'the same label budget' if s.get('canvas_label_budget') else 'every label'}.",
             "",
             "| encoder start | labels | labelled patches | method | accuracy (%) | PR-AUC (%) | ROC-AUC (%) "
             "| tumor points |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    for r in result["rows"]:
        lines.append(f"| {r['init']} | {100 * r['label_fraction']:g} % | {r['labelled_patches']} | {r['method']} | "
                     f"{pct(r['pooled_accuracy'])} | {pct(r['pooled_pr_auc'])} | {pct(r['pooled_roc_auc'])} | "
                     f"{r['total_tumor_points']} |")
    return "\n".join(lines) + "\n"
