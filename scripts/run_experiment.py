"""The paper's comparison as one command: classifier only, segmentation only, frozen features, separate and
end-to-end learning, trained with several seeds on one generated benchmark and evaluated with the same metrics.

Example:
    python scripts/run_experiment.py run                      # the default (configs/experiments/paper_comparison.json)
    python scripts/run_experiment.py run --quick              # smoke-test size (configs/experiments/quick.json)
    python scripts/run_experiment.py run --seeds "[0,1]" --n_train 4 --encoder_epochs 2 --tumor_points 8

Every training and inference stage is the bundle's own config run through ``monai.bundle.run`` (the commands of
``bundle/docs/paper_comparison.md``), with the sizes of the experiment preset as overrides; the script only chains them,
then writes ``results.json``, ``results.md`` (mean ± sd over seeds) and ``figure.png`` (per test slide: the slide,
its ground-truth map and every method's map, as the paper's Figure 5).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import fire

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
PRESETS = REPO / "configs" / "experiments"

__all__ = ["run", "load_preset", "METHODS"]

logger = logging.getLogger("run_experiment")

METHODS = ("classifier", "segmentation", "frozen", "separate", "e2e")


def load_preset(preset: str) -> dict:
    """An experiment preset: a name in ``configs/experiments`` (without ``.json``) or a path to a JSON file."""
    path = Path(preset)
    if not path.suffix:
        path = PRESETS / f"{preset}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise SystemExit(f"error: experiment preset {preset!r} not found (looked for {path}); known: {known}")
    return json.loads(path.read_text())


def _bundle(configs: list[str], **overrides: Any) -> None:
    from monai.bundle import run as bundle_run

    files = [str(CONFIGS / "common.json")] + [str(CONFIGS / c) for c in configs]
    bundle_run(config_file=files, meta_file=str(CONFIGS / "metadata.json"),
               logging_file=str(CONFIGS / "logging.conf"), **overrides)


def _choose_threads(threads: int | None) -> int:
    """``threads`` or, when None, 1 on a busy machine (OpenMP threads that share cores with other processes
    spin-wait and slow training down by 5-10x) and every core otherwise."""
    cores = os.cpu_count() or 1
    if threads:
        return int(threads)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return 1 if load > cores - 0.5 else cores


def _subset_prepared(prepared: Path, dest: Path, n_train: int) -> Path:
    """A prepared folder with the first ``n_train`` training slides and all validation slides (for end-to-end)."""
    from monai_wsi_ext.prep.prepare import load_prepared_slides

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    train = [m.slide_id for m in load_prepared_slides(prepared, "training")][: max(int(n_train), 1)]
    val = [m.slide_id for m in load_prepared_slides(prepared, "validation")]
    for sid in train + val:
        shutil.copytree(prepared / sid, dest / sid)
    return dest


def _merge(preset: dict, overrides: dict) -> dict:
    cfg = copy.deepcopy(preset)
    data, gen = cfg.setdefault("data", {}), cfg.setdefault("data", {}).setdefault("generator", {})
    for key in ("n_train", "n_val", "n_test", "size", "data_seed"):
        if overrides.get(key) is not None:
            data[key] = int(overrides[key])
    for key in ("tumor_points", "normal_looking_tumor_fraction"):
        if overrides.get(key) is not None:
            gen[key] = overrides[key]
    gen.update(overrides.get("generator") or {})
    if overrides.get("seeds") is not None:
        seeds = overrides["seeds"]
        cfg["seeds"] = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    if overrides.get("methods") is not None:
        methods = overrides["methods"]
        methods = methods.split(",") if isinstance(methods, str) else list(methods)
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
        cfg["methods"] = [m for m in METHODS if m in methods]
    for section, key, arg in (("encoder", "max_epochs", "encoder_epochs"), ("canvas", "max_epochs", "canvas_epochs"),
                              ("segmentation", "max_epochs", "seg_epochs"), ("e2e", "max_epochs", "e2e_epochs"),
                              ("e2e", "n_slides", "e2e_slides"), ("frozen", "pretrained_path", "pretrained_path")):
        if overrides.get(arg) is not None:
            cfg.setdefault(section, {})[key] = overrides[arg]
    if "separate" not in cfg["methods"] and "e2e" in cfg["methods"]:
        cfg["methods"].insert(cfg["methods"].index("e2e"), "separate")  # end-to-end starts from separate weights
    if "classifier" not in cfg["methods"] and ({"separate", "e2e"} & set(cfg["methods"])):
        cfg["methods"].insert(0, "classifier")  # ... and separate from the trained encoder
    return cfg


def _run_seed(cfg: dict, seed: int, root: Path, prepared: Path, truth: Path, timings: dict) -> dict[str, Path]:
    """Train and predict every method for one seed; returns method -> heatmap folder."""
    sd = root / f"seed_{seed}"
    hm = sd / "heatmaps"
    b = cfg["bundle"]
    common = {"dataset_dir": str(prepared), "output_dir": str(sd / "bundle"), "ckpt_dir": str(sd / "models"),
              "seed": int(seed), "backbone": b["backbone"], "crop_size": int(b["crop_size"]),
              "canvas_size": int(b["canvas_size"]), "num_workers": int(b.get("num_workers", 0)),
              "patch_size": int(cfg["data"]["patch_size"])}
    methods = cfg["methods"]
    out: dict[str, Path] = {}

    def stage(name: str, configs: list[str], **kw: Any) -> None:
        t = time.perf_counter()
        logger.info("seed %d: %s", seed, name)
        _bundle(configs, **{**common, **kw})
        timings[f"seed {seed}: {name}"] = round(time.perf_counter() - t, 1)

    if {"classifier", "separate", "e2e"} & set(methods):
        e = cfg["encoder"]
        stage("train encoder", ["train_encoder.json"], max_epochs=int(e["max_epochs"]), batch_size=int(e["batch_size"]),
              learning_rate=float(e["learning_rate"]), samples_per_epoch=e.get("samples_per_epoch"))
        stage("classifier-only heatmaps", ["inference.json", "baseline_classifier.json"],
              heatmap_dir=str(hm / "classifier"))
        out["classifier"] = hm / "classifier"
    if {"separate", "e2e"} & set(methods):
        c = cfg["canvas"]
        stage("extract features", ["extract_features.json"])
        stage("train canvas U-Net", ["train_canvas.json"], max_epochs=int(c["max_epochs"]),
              batch_size=int(c["batch_size"]), samples_per_slide=int(c["samples_per_slide"]),
              learning_rate=float(c["learning_rate"]))
        stage("separate heatmaps", ["inference.json"], mode="canvas", heatmap_dir=str(hm / "separate"))
        out["separate"] = hm / "separate"
    if "frozen" in methods:
        c, f = cfg["canvas"], cfg.get("frozen", {})
        frozen = {"ckpt_dir": str(sd / "models_frozen"), "feature_dir": str(sd / "bundle" / "features_frozen"),
                  "pretrained_path": f.get("pretrained_path")}
        stage("frozen: extract features", ["extract_features.json", "baseline_frozen_features.json"], **frozen)
        stage("frozen: train canvas U-Net", ["train_canvas.json", "baseline_frozen_features.json"],
              max_epochs=int(c["max_epochs"]), batch_size=int(c["batch_size"]),
              samples_per_slide=int(c["samples_per_slide"]), learning_rate=float(c["learning_rate"]), **frozen)
        stage("frozen heatmaps", ["inference.json", "baseline_frozen_features.json"], mode="canvas",
              heatmap_dir=str(hm / "frozen"), **frozen)
        out["frozen"] = hm / "frozen"
    if "segmentation" in methods:
        s = cfg["segmentation"]
        stage("segmentation only: train + predict", ["baseline_segmentation.json"], ckpt_dir=str(sd / "models_seg"),
              heatmap_dir=str(hm / "segmentation"), max_epochs=int(s["max_epochs"]), batch_size=int(s["batch_size"]),
              samples_per_slide=int(s["samples_per_slide"]), learning_rate=float(s["learning_rate"]),
              seg_downsample=s["seg_downsample"], seg_crop_size=int(s["seg_crop_size"]))
        out["segmentation"] = hm / "segmentation"
    if "e2e" in methods:
        e2e = cfg["e2e"]
        subset = _subset_prepared(prepared, sd / "prepared_e2e", int(e2e["n_slides"]))
        stage("end-to-end training", ["train_e2e.json"], dataset_dir=str(subset), max_epochs=int(e2e["max_epochs"]),
              encoder_lr=float(e2e["encoder_lr"]), unet_lr=float(e2e["unet_lr"]), chunk_size=int(e2e["chunk_size"]),
              subset_size=e2e.get("subset_size"))
        models = sd / "models"
        stage("end-to-end heatmaps", ["inference.json"], mode="canvas", heatmap_dir=str(hm / "e2e"),
              encoder_ckpt=str(models / "encoder_e2e.pt"), unet_ckpt=str(models / "unet_e2e.pt"))
        out["e2e"] = hm / "e2e"
    out = {m: out[m] for m in METHODS if m in out and m in methods}
    for method, folder in out.items():
        t = time.perf_counter()
        _bundle(["evaluate.json"], heatmap_dir=str(folder), truth_dir=str(truth), output_dir=str(sd / "bundle"))
        timings[f"seed {seed}: evaluate {method}"] = round(time.perf_counter() - t, 1)
    return out


def run(output_dir: str = "experiment_output", preset: str = "paper_comparison", quick: bool = False,
        seeds: Any = None, methods: Any = None, n_train: int | None = None, n_val: int | None = None,
        n_test: int | None = None, size: int | None = None, data_seed: int | None = None,
        tumor_points: int | None = None, normal_looking_tumor_fraction: float | None = None,
        generator: dict | None = None, encoder_epochs: int | None = None, canvas_epochs: int | None = None,
        seg_epochs: int | None = None, e2e_epochs: int | None = None, e2e_slides: int | None = None,
        pretrained_path: str | None = None, threads: int | None = None, figure: str | None = None,
        table: str | None = None, max_figure_slides: int = 3, log_level: str = "INFO") -> dict:
    """Generate the benchmark, train and evaluate every method for every seed, write the table and the figure.

    Args:
        output_dir: everything goes here: ``data/`` (slides), ``prepared/``, ``seed_<s>/`` (checkpoints,
            features, heatmaps and metrics per method), ``results.json``, ``results.md``, ``figure.png``.
        preset: experiment preset (``configs/experiments/<name>.json`` or a JSON path).
        quick: use the ``quick`` preset (a few minutes; for tests).
        seeds: training seeds, e.g. ``"[0,1,2]"`` (the benchmark's slides stay the same).
        methods: subset of ``classifier,segmentation,frozen,separate,e2e``.
        n_train: training slides.
        n_val: validation slides.
        n_test: test slides (the table is computed on them).
        size: side of each generated slide in level-0 pixels.
        data_seed: seed of the slide generator.
        tumor_points: isolated tumor-looking spots with normal ground truth per slide.
        normal_looking_tumor_fraction: fraction of tumor cells rendered normal-looking.
        generator: further :class:`monai_wsi_ext.testing.synthetic.SyntheticSlideConfig` fields.
        encoder_epochs: patch-encoder epochs.
        canvas_epochs: canvas U-Net epochs (separate and frozen features).
        seg_epochs: segmentation-only U-Net epochs.
        e2e_epochs: end-to-end epochs.
        e2e_slides: training slides used by end-to-end training.
        pretrained_path: backbone weights for the frozen-feature baseline (None: seeded random init).
        threads: torch CPU threads (None: 1 on a busy machine, else all cores).
        figure: also copy the figure to this path (e.g. ``bundle/docs/experiment_figure.png``).
        table: also copy the Markdown table to this path.
        max_figure_slides: test slides shown in the figure.
        log_level: logging level.

    Returns:
        The results (also in ``results.json``).
    """
    import numpy as np
    import torch

    from monai_wsi_ext.evaluation.report import comparison_figure, markdown_table, summarize_runs

    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset

    logging.basicConfig(level=str(log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    overrides = dict(seeds=seeds, methods=methods, n_train=n_train, n_val=n_val, n_test=n_test, size=size,
                     data_seed=data_seed, tumor_points=tumor_points,
                     normal_looking_tumor_fraction=normal_looking_tumor_fraction, generator=generator,
                     encoder_epochs=encoder_epochs, canvas_epochs=canvas_epochs, seg_epochs=seg_epochs,
                     e2e_epochs=e2e_epochs, e2e_slides=e2e_slides, pretrained_path=pretrained_path)
    preset_name = "quick" if quick else preset
    cfg = _merge(load_preset(preset_name), overrides)
    n_threads = _choose_threads(threads)
    torch.set_num_threads(n_threads)
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    d = cfg["data"]
    logger.info("experiment %r: %d/%d/%d slides of %d px, seeds %s, methods %s, %d torch thread(s)", preset_name,
                d["n_train"], d["n_val"], d["n_test"], d["size"], cfg["seeds"], cfg["methods"], n_threads)
    manifest = generate_dataset(root / "data", n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"],
                                seed=d["data_seed"], width=d["size"], height=d["size"], patch_size=d["patch_size"],
                                **d.get("generator", {}))
    timings["generate slides"] = round(time.perf_counter() - t0, 1)
    t = time.perf_counter()
    summary = prepare_dataset(collect_inputs(manifest=manifest), root / "prepared",
                              PrepareConfig(patch_size=d["patch_size"], thumbnail_max_size=1024), progress=False)
    if summary["failed"]:
        raise SystemExit(f"error: preparation failed for {summary['failed']}")
    timings["prepare"] = round(time.perf_counter() - t, 1)
    heatmaps: dict[int, dict[str, Path]] = {}
    for seed in cfg["seeds"]:
        heatmaps[int(seed)] = _run_seed(cfg, int(seed), root, root / "prepared", manifest, timings)
    per_seed = {seed: {m: json.loads((p / "metrics_overall.json").read_text()) for m, p in hm.items()}
                for seed, hm in heatmaps.items()}
    summary_rows = summarize_runs(per_seed, cfg["methods"])
    total = time.perf_counter() - t0
    command = "python scripts/run_experiment.py run " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    pretrained = cfg.get("frozen", {}).get("pretrained_path")
    frozen_desc = f"backbone weights {pretrained}" if pretrained else "seeded random encoder"
    caption = (f"{d['n_test']} test slides ({d['n_train']} training, {d['n_val']} validation; {d['size']} px, "
               f"{d['patch_size']} px patches; generator {json.dumps(d.get('generator', {}), sort_keys=True)}), "
               f"seeds {cfg['seeds']}; mean ± sd over seeds; frozen features: {frozen_desc}; end-to-end: "
               f"{cfg['e2e']['max_epochs']} epoch(s) on {cfg['e2e']['n_slides']} training slide(s); "
               f"{total / 60:.0f} min on {os.cpu_count()} CPU core(s), {n_threads} torch thread(s).")
    md = markdown_table(summary_rows, caption=caption)
    (root / "results.md").write_text(md)
    first = int(cfg["seeds"][0])
    fig = comparison_figure(heatmaps[first], root / "figure.png", prepared_dir=root / "prepared",
                            max_slides=max_figure_slides)
    results = {"preset": preset_name, "config": cfg, "command": command, "threads": n_threads,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "numpy": np.__version__},
               "summary": summary_rows, "per_seed": {str(k): v for k, v in per_seed.items()},
               "timings_s": timings, "total_s": round(total, 1), "table_md": str(root / "results.md"),
               "figure": str(fig)}
    from monai_wsi_ext.utils import json_clean
    from monai_wsi_ext.io.atomic import write_json_atomic

    write_json_atomic(root / "results.json", json_clean(results))
    if figure:
        Path(figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fig, figure)
    if table:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        Path(table).write_text(md)
    print("\n" + md)
    print(f"figure: {fig}\nresults: {root / 'results.json'}\ntotal {total / 60:.1f} min")
    return results


@functools.wraps(run)
def _cli_run(*args, **kwargs) -> None:
    run(*args, **kwargs)  # printed and saved; returning it would make fire print it again


if __name__ == "__main__":
    fire.Fire({"run": _cli_run})
