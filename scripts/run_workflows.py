"""The review articles' workflows next to the canvas method, on one generated benchmark with tumor-free slides
(issue 12): tile U-Net, Mask R-CNN, slide CNN, heatmap aggregation and the hierarchical chain, each trained and
evaluated with the same metrics.

Example:
    python scripts/run_workflows.py run                       # configs/experiments/workflows.json
    python scripts/run_workflows.py run --quick               # smoke test (configs/experiments/workflows_quick.json)
    python scripts/run_workflows.py run --methods "[tile_unet,maskrcnn]" --output_dir /tmp/wf

Every stage is a bundle config run through ``monai.bundle.run`` (the commands of ``bundle/docs/slide_level.md`` and
``bundle/docs/tile_segmentation.md``) with the preset's sizes as overrides. Methods:

* ``separate``: the paper's canvas method (patch encoder, features, canvas U-Net), the reference;
* ``tile_unet``: ``train_tile_seg.json`` + ``infer_tile_seg.json``;
* ``maskrcnn``: ``train_maskrcnn.json`` + ``infer_maskrcnn.json`` (lesion FROC from its instances' scores);
* ``slide_cnn``: ``train_slide_cnn.json`` + ``infer_slide_cnn.json`` (slide-level only);
* ``aggregation``: ``aggregate_heatmaps.json`` fitted on the validation heatmaps of the methods in
  ``aggregation.of`` (slide-level only);
* ``hierarchical``: ``hierarchical.json`` over the ``hierarchical.method``'s inference, gated by the slide CNN,
  compared with that method run on every slide.

Writes ``results.json`` and ``results.md`` (one row per method: patch accuracy, PR-AUC, ROC-AUC, pixel Dice, tumor
points, lesion FROC, slide ROC-AUC and accuracy, seconds of training and inference; the hierarchical chain's
slides skipped, compute saved and sensitivity lost).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import fire

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
PRESETS = REPO / "configs" / "experiments"
METHODS = ("separate", "tile_unet", "maskrcnn", "slide_cnn", "aggregation", "hierarchical")

__all__ = ["run", "METHODS"]

logger = logging.getLogger("run_workflows")


def _bundle(configs: list[str], **overrides: Any) -> None:
    from monai.bundle import run as bundle_run

    files = [str(CONFIGS / "common.json")] + [str(CONFIGS / c) for c in configs]
    bundle_run(config_file=files, meta_file=str(CONFIGS / "metadata.json"),
               logging_file=str(CONFIGS / "logging.conf"), **overrides)


def _load(preset: str) -> dict:
    path = Path(preset) if Path(preset).suffix else PRESETS / f"{preset}.json"
    if not path.is_file():
        raise SystemExit(f"error: preset {preset!r} not found ({path}); known: "
                         f"{sorted(p.stem for p in PRESETS.glob('workflows*.json'))}")
    return json.loads(path.read_text())


def _fmt(v: Any, scale: float = 1.0, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v) * scale:.{digits}f}"


def _mean_pixel_dice(folder: Path, labels: dict[str, int]) -> float | None:
    """Mean pixel Dice over the tumor slides of a tile-segmentation folder (from the records), or None."""
    vals = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        rec = sub / f"{sub.name}_record.json"
        if rec.is_file() and labels.get(sub.name):
            d = json.loads(rec.read_text()).get("pixel_dice")
            if d is not None:
                vals.append(float(d))
    return sum(vals) / len(vals) if vals else None


def _table(rows: list[dict], caption: str) -> str:
    head = ("| Method | Accuracy (%) | PR-AUC (%) | ROC-AUC (%) | Pixel Dice (%) | Tumor points / slide | FROC | "
            "Slide ROC-AUC (%) | Slide accuracy (%) | Train (s) | Infer (s) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['label']} | {_fmt(r.get('pooled_accuracy'), 100)} | {_fmt(r.get('pooled_pr_auc'), 100)} | "
                     f"{_fmt(r.get('pooled_roc_auc'), 100)} | {_fmt(r.get('pixel_dice'), 100)} | "
                     f"{_fmt(r.get('mean_tumor_points'), 1, 2)} | {_fmt(r.get('froc'), 1, 3)} | "
                     f"{_fmt(r.get('slide_roc_auc'), 100)} | {_fmt(r.get('slide_accuracy'), 100)} | "
                     f"{_fmt(r.get('train_s'), 1, 0)} | {_fmt(r.get('infer_s'), 1, 0)} |")
    return caption + "\n\n" + "\n".join(lines) + "\n"


def run(output_dir: str = "workflows_output", preset: str = "workflows", quick: bool = False, methods: Any = None,
        seed: int | None = None, threads: int | None = 1, log_level: str = "INFO") -> dict:
    """Generate the benchmark (tumor and tumor-free slides), train and evaluate every method, write the table.

    Args:
        output_dir: ``data/``, ``prepared/``, ``models/``, ``bundle/`` (heatmaps per method), ``results.json``,
            ``results.md``.
        preset: ``configs/experiments/<name>.json`` or a JSON path.
        quick: the ``workflows_quick`` preset (for tests).
        methods: subset of the preset's methods.
        seed: training seed (preset ``seeds[0]``).
        threads: torch CPU threads.
        log_level: logging level.

    Returns:
        The results (also in ``results.json``).
    """
    import torch

    from monai_wsi_ext.evaluation.report import evaluate_heatmaps
    from monai_wsi_ext.io.atomic import write_json_atomic
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.slidecls.scores import find_slide_scores
    from monai_wsi_ext.testing.slide_sets import generate_mixed_dataset
    from monai_wsi_ext.utils import json_clean, setup_logging

    setup_logging(log_level)
    cfg = copy.deepcopy(_load("workflows_quick" if quick else preset))
    if methods is not None:
        wanted = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
        unknown = sorted(set(wanted) - set(METHODS))
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
        cfg["methods"] = [m for m in METHODS if m in wanted]
    need = set(cfg["methods"])
    if "hierarchical" in need:
        need |= {"slide_cnn", cfg["hierarchical"]["method"]}
    if "aggregation" in need:
        need |= set(cfg["aggregation"]["of"])
    seed = int(cfg["seeds"][0] if seed is None else seed)
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    d = cfg["data"]
    manifest = generate_mixed_dataset(root / "data", n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"],
                                      seed=d["data_seed"], tumor_free_fraction=d["tumor_free_fraction"],
                                      width=d["size"], height=d["size"], patch_size=d["patch_size"],
                                      **d.get("generator", {}))
    prepared = root / "prepared"
    summary = prepare_dataset(collect_inputs(manifest=manifest), prepared,
                              PrepareConfig(patch_size=d["patch_size"], thumbnail_max_size=512), progress=False)
    if summary["failed"]:
        raise SystemExit(f"error: preparation failed for {summary['failed']}")
    labels = {r["id"]: int(not r["tumor_free"]) for r in json.loads(Path(manifest).read_text())["slides"]}
    b = cfg["bundle"]
    common = {"dataset_dir": str(prepared), "output_dir": str(root / "bundle"), "ckpt_dir": str(root / "models"),
              "seed": seed, "num_workers": int(b.get("num_workers", 0)), "patch_size": int(d["patch_size"])}
    hm = root / "bundle"
    timings: dict[str, float] = {}
    folders: dict[str, Path] = {}
    val_folders: dict[str, Path] = {}
    infer: dict[str, tuple[list[str], dict]] = {}

    def stage(name: str, configs: list[str], **kw: Any) -> float:
        t = time.perf_counter()
        logger.info("%s", name)
        _bundle(configs, **{**common, **kw})
        timings[name] = round(time.perf_counter() - t, 1)
        return timings[name]

    if "separate" in need:
        canvas = {"backbone": b["backbone"], "crop_size": int(b["crop_size"]), "canvas_size": int(b["canvas_size"])}
        e, c = cfg["encoder"], cfg["canvas"]
        stage("separate: train encoder", ["train_encoder.json"], max_epochs=int(e["max_epochs"]),
              batch_size=int(e["batch_size"]), learning_rate=float(e["learning_rate"]),
              samples_per_epoch=e.get("samples_per_epoch"), **canvas)
        stage("separate: extract features", ["extract_features.json"], **canvas)
        stage("separate: train canvas", ["train_canvas.json"], max_epochs=int(c["max_epochs"]),
              batch_size=int(c["batch_size"]), samples_per_slide=int(c["samples_per_slide"]),
              learning_rate=float(c["learning_rate"]), **canvas)
        infer["separate"] = (["inference.json"], {"mode": "canvas", **canvas})
    if "tile_unet" in need:
        t = cfg["tile_unet"]
        stage("tile_unet: train", ["train_tile_seg.json"], tile_size=int(t["tile_size"]),
              max_epochs=int(t["max_epochs"]), batch_size=int(t["batch_size"]),
              samples_per_epoch=int(t["samples_per_epoch"]),
              learning_rate=float(t["learning_rate"]))
        infer["tile_unet"] = (["infer_tile_seg.json"], {"tile_size": int(t["tile_size"]),
                                                        "min_object_um2": float(t["min_object_um2"])})
    if "maskrcnn" in need:
        m = cfg["maskrcnn"]
        stage("maskrcnn: train", ["train_maskrcnn.json"], tile_size=int(m["tile_size"]),
              max_epochs=int(m["max_epochs"]), batch_size=int(m["batch_size"]),
              samples_per_epoch=int(m["samples_per_epoch"]),
              learning_rate=float(m["learning_rate"]), val_interval=int(m["val_interval"]),
              val_max_tiles=int(m["val_max_tiles"]))
        infer["maskrcnn"] = (["infer_maskrcnn.json"], {"tile_size": int(m["tile_size"]),
                                                       "tile_overlap": float(m["tile_overlap"]),
                                                       "min_object_um2": float(m["min_object_um2"])})
    for method, (configs, kw) in infer.items():
        folders[method] = hm / f"heatmaps_{method}"
        stage(f"{method}: infer", configs, heatmap_dir=str(folders[method]), **kw)
        if "aggregation" in need and method in cfg["aggregation"]["of"]:
            val_folders[method] = hm / f"heatmaps_{method}_val"
            stage(f"{method}: infer validation", configs, heatmap_dir=str(val_folders[method]), split="validation",
                  **kw)
    scores: list[Path] = []
    if "slide_cnn" in need:
        s = cfg["slide_cnn"]
        sz = {"thumb_mpp": float(s["thumb_mpp"]), "thumb_size": int(s["thumb_size"])}
        stage("slide_cnn: train", ["train_slide_cnn.json"], max_epochs=int(s["max_epochs"]),
              samples_per_epoch=int(s["samples_per_epoch"]), learning_rate=float(s["learning_rate"]), **sz)
        scores.append(hm / "slide_scores_slide_cnn.json")
        stage("slide_cnn: infer", ["infer_slide_cnn.json"], slide_scores_path=str(scores[-1]), **sz)
    if "aggregation" in cfg["methods"]:
        for method in cfg["aggregation"]["of"]:
            scores.append(hm / f"slide_scores_aggregation_{method}.json")
            stage(f"aggregation of {method}", ["aggregate_heatmaps.json"], heatmap_dir=str(folders[method]),
                  val_heatmap_dir=str(val_folders[method]), truth_dir=str(manifest),
                  aggregator=cfg["aggregation"]["aggregator"], slide_scores_path=str(scores[-1]),
                  aggregator_path=str(root / "models" / f"aggregator_{method}.joblib"),
                  **{"aggregation#method": f"aggregation_{method}"})
    hier = None
    if "hierarchical" in cfg["methods"]:
        h = cfg["hierarchical"]
        configs, kw = infer[h["method"]]
        s = cfg["slide_cnn"]
        folders["hierarchical"] = hm / "heatmaps_hierarchical"
        stage("hierarchical: infer", configs + ["hierarchical.json"], heatmap_dir=str(folders["hierarchical"]),
              gate_thumb_mpp=float(s["thumb_mpp"]), gate_thumb_size=int(s["thumb_size"]),
              gate_threshold=float(h["gate_threshold"]), full_heatmap_dir=str(folders[h["method"]]),
              truth_dir=str(manifest), **kw)
        hier = json.loads((folders["hierarchical"] / "hierarchical_summary.json").read_text())
    # evaluation: every heatmap folder with the same metrics; the slide-level files on the same slides
    rows, per_method = [], {}
    slide_rows: dict[str, dict] = {}
    for method, folder in folders.items():
        res = evaluate_heatmaps(folder, truth=str(manifest), output_dir=folder,
                                froc_candidates="file" if method == "maskrcnn" else "components",
                                slide_predictions=[str(p) for p in scores] if scores else None)
        o = res["overall"]
        per_method[method] = o
        slide_rows.update({k: v for k, v in (o.get("slide_methods") or {}).items() if k != "heatmap_max"})
        heat = (o.get("slide_methods") or {}).get("heatmap_max", {})
        train_s = sum(v for k, v in timings.items() if k.startswith(f"{method}:") and "train" in k)
        if method == "separate":
            train_s = sum(v for k, v in timings.items() if k.startswith("separate:") and "infer" not in k)
        rows.append({"method": method, "label": method, "pooled_accuracy": o.get("pooled_accuracy"),
                     "pooled_pr_auc": o.get("pooled_pr_auc"), "pooled_roc_auc": o.get("pooled_roc_auc"),
                     "pixel_dice": _mean_pixel_dice(folder, labels), "mean_tumor_points": o.get("mean_tumor_points"),
                     "froc": o.get("froc"), "slide_roc_auc": heat.get("roc_auc", o.get("slide_auc")),
                     "slide_accuracy": heat.get("accuracy", o.get("slide_accuracy")),
                     "train_s": train_s if method != "hierarchical" else None,
                     "infer_s": timings.get(f"{method}: infer")})
    for sc in find_slide_scores([str(p) for p in scores]) if scores else []:
        r = slide_rows.get(sc.method, {})
        name = sc.method
        train_s = timings.get("slide_cnn: train") if name == "slide_cnn" else None
        infer_s = timings.get("slide_cnn: infer") if name == "slide_cnn" else timings.get(
            f"aggregation of {name.replace('aggregation_', '', 1)}")
        rows.append({"method": name, "label": name + (" (slide level)" if name == "slide_cnn" else ""),
                     "slide_roc_auc": r.get("roc_auc"), "slide_accuracy": r.get("accuracy"), "train_s": train_s,
                     "infer_s": infer_s})
    total = time.perf_counter() - t0
    caption = (f"{d['n_test']} test slides ({d['n_train']} training, {d['n_val']} validation; {d['size']} px at "
               f"0.5 µm/px, {int(100 * d['tumor_free_fraction'])}% tumor-free, {d['patch_size']} px patches; "
               f"generator "
               f"{json.dumps(d.get('generator', {}), sort_keys=True)}), seed {seed}; {total / 60:.0f} min on "
               f"{os.cpu_count()} CPU core(s), {torch.get_num_threads()} torch thread(s). Slide ROC-AUC/accuracy of "
               "heatmap rows: the heatmap maximum at 0.5.")
    md = _table(rows, caption)
    if hier is not None:
        vs = hier.get("vs_full", {})
        md += (f"\nHierarchical chain (slide CNN gate > {hier['gate_threshold']} -> {cfg['hierarchical']['method']}): "
               f"{hier['n_skipped']} of {hier['n_slides']} slides skipped ({hier.get('patches_skipped')} of "
               f"{hier.get('patches_total')} patches, {hier.get('tiles_skipped')} tiles), tumor slides skipped "
               f"{hier['slides_with_tumor_skipped']}; {vs.get('chain_seconds')} s vs {vs.get('full_seconds')} s for "
               f"the full method (saved {_fmt(vs.get('saved_fraction'), 100)}%); sensitivity lost: slides "
               f"{_fmt(vs.get('slide_sensitivity_lost'), 100)}%, tumor patches "
               f"{_fmt(vs.get('patch_sensitivity_lost'), 100)}%, FROC {_fmt(vs.get('froc_lost'), 1, 3)}.\n")
    (root / "results.md").write_text(md)
    command = "python scripts/run_workflows.py run " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    results = {"config": cfg, "command": command, "rows": rows, "per_method": per_method, "hierarchical": hier,
               "timings_s": timings, "total_s": round(total, 1), "table_md": str(root / "results.md")}
    write_json_atomic(root / "results.json", json_clean(results))
    print("\n" + md)
    return results


@functools.wraps(run)
def _cli_run(*args, **kwargs) -> None:
    run(*args, **kwargs)


if __name__ == "__main__":
    fire.Fire({"run": _cli_run})
