"""The paper's comparison as one command: classifier only, segmentation only, frozen features, separate and
end-to-end learning, trained with several seeds on one generated benchmark and evaluated with the same metrics.

Example:
    python scripts/run_experiment.py run                      # the default (configs/experiments/paper_comparison.json)
    python scripts/run_experiment.py run --quick              # smoke-test size (configs/experiments/quick.json)
    python scripts/run_experiment.py run --seeds "[0,1]" --n_train 4 --encoder_epochs 2 --tumor_points 8
    python scripts/run_experiment.py run --preset cross_family --output_dir /tmp/xfam --threads 1   # cross-family

Every training and inference stage is the bundle's own config run through ``monai.bundle.run`` (the commands of
``bundle/docs/paper_comparison.md``), with the sizes of the experiment preset as overrides; the script only chains them,
then writes ``results.json``, ``results.md`` (mean ± sd over seeds) and ``figure.png`` (per test slide: the slide,
its ground-truth map and every method's map, as the paper's Figure 5).

Cross-family (issue 11): ``data.family`` is the training family (``synthetic``, ``texture`` or ``cells`` of
``monai_wsi_ext.testing.families``; default ``synthetic``), ``test_families`` the families whose test split every
trained method predicts (default: only the training family, the behaviour above; ``data.family`` may be a mix,
``["synthetic", "cells"]`` or ``"synthetic+cells"``, whose test slides form the in-family table),
``family_kwargs`` per-family generator settings and ``data.read_mpp`` the common read resolution (every family is
prepared with ``PrepareConfig.target_mpp = read_mpp``, so the grid cell is the same µm on every family; checked).
A test family other than the training one gets ``data_<family>/``, ``prepared_<family>/`` (test split only) and
``seed_<s>/heatmaps_<family>/<method>/`` (evaluated with ``evaluate.json`` against that family's truth); the
pooled cross-family metrics (all those slides, patches pooled) go to
``seed_<s>/pooled_cross_family/<method>/metrics_overall.json``; ``results.md`` then has the in-family, pooled
cross-family and per-family tables with the method-minus-classifier differences (helpers in
``monai_wsi_ext/testing/cross_family.py``; see ``bundle/docs/cross_family.md``).

Operating threshold: with ``validation_threshold: accuracy`` (preset key or ``--validation_threshold``) every table is
also rescored at the threshold chosen per seed and method on the training family's validation slides
(``results_validation_threshold.md``); ``python scripts/run_experiment.py threshold --output_dir <run>`` does the same
for a finished run.
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

__all__ = ["run", "threshold", "load_preset", "METHODS"]

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


def _predict_dir_overrides(configs: list[str], folder: str, skip: tuple[str, ...] = ("train", "validate")) -> dict:
    """``{id: folder}`` for every entry ``"@dataset_dir"`` of ``configs`` outside the ``skip`` sections: the
    segmentation baseline's predictor reads another family's prepared folder while its trainer (built, not run)
    keeps the training family's."""
    out: dict[str, str] = {}

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [str(i)])
        elif node == "@dataset_dir" and path and path[0] not in skip:
            out["#".join(path)] = folder

    for name in configs:
        walk(json.loads((CONFIGS / name).read_text()), [])
    if not out:
        raise SystemExit(f"error: no '@dataset_dir' entry to redirect in {configs} (outside {list(skip)})")
    return out


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
    if overrides.get("family") is not None:
        data["family"] = overrides["family"]
    if overrides.get("read_mpp") is not None:
        data["read_mpp"] = float(overrides["read_mpp"])
    if overrides.get("test_families") is not None:
        fams = overrides["test_families"]
        cfg["test_families"] = [f.strip() for f in fams.split(",")] if isinstance(fams, str) else list(fams)
    from monai_wsi_ext.testing.cross_family import family_components
    from monai_wsi_ext.testing.families import FAMILIES

    # one family ("synthetic") or a mix ("synthetic+cells" or a list), named by its families joined with "+"
    parts = family_components(data.setdefault("family", "synthetic"))
    data["family"] = "+".join(parts)
    # the training family's own test split is always predicted and reported (the in-family table)
    cfg["test_families"] = list(dict.fromkeys([data["family"], *(cfg.get("test_families") or [])]))
    unknown = sorted({*parts, *cfg["test_families"][1:]} - set(FAMILIES))
    if unknown:
        raise SystemExit(f"error: unknown slide family/families {unknown}; choose from {list(FAMILIES)}")
    if len(parts) > 1 and set(parts) & set(cfg["test_families"][1:]):
        raise SystemExit(f"error: {sorted(set(parts) & set(cfg['test_families'][1:]))} trained on (in the mix "
                         f"{data['family']!r}) cannot be a cross-family test family; its test slides are in the "
                         "in-family table")
    cfg.setdefault("family_kwargs", {})
    if cfg["test_families"] != [data["family"]] and data.get("read_mpp") is None:
        data["read_mpp"] = 0.5  # one physical cell size on every family (64 px at 0.5 µm/px = 32 µm)
    if overrides.get("validation_threshold") is not None:
        cfg["validation_threshold"] = overrides["validation_threshold"]
    if cfg.get("validation_threshold"):
        _criterion(cfg["validation_threshold"])
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


def _out_of_fold_features(cfg: dict, sd: Path, prepared: Path, stage) -> Path:
    """The canvas U-Net's training features out of fold (preset ``canvas.out_of_fold: k``, see
    :mod:`monai_wsi_ext.testing.out_of_fold`): per fold an encoder trained on the other folds' training slides (same
    schedule and validation slides) encodes the fold's slides; the validation slides keep the features of the encoder
    trained on all training slides (``<output_dir>/features``, extracted before). Returns the assembled folder."""
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.testing.out_of_fold import assemble_features, assign_folds, subset_prepared

    e, k = cfg["encoder"], int(cfg["canvas"]["out_of_fold"])
    train = [m.slide_id for m in load_prepared_slides(prepared, "training")]
    val = [m.slide_id for m in load_prepared_slides(prepared, "validation")]
    sources = {sid: sd / "bundle" / "features" for sid in val}
    for i, fold in enumerate(assign_folds(train, k)):
        rest = [sid for sid in train if sid not in fold]
        fold_dir = sd / f"oof_{i}"
        stage(f"out-of-fold {i}/{k}: train encoder", ["train_encoder.json"],
              dataset_dir=str(subset_prepared(prepared, fold_dir / "prepared_train", rest + val)),
              ckpt_dir=str(fold_dir / "models"), output_dir=str(fold_dir / "bundle"),
              max_epochs=int(e["max_epochs"]), batch_size=int(e["batch_size"]),
              learning_rate=float(e["learning_rate"]), samples_per_epoch=e.get("samples_per_epoch"),
              **e.get("overrides", {}))
        stage(f"out-of-fold {i}/{k}: extract features", ["extract_features.json"],
              dataset_dir=str(subset_prepared(prepared, fold_dir / "prepared_fold", fold)),
              ckpt_dir=str(fold_dir / "models"), output_dir=str(fold_dir / "bundle"),
              feature_dir=str(fold_dir / "features"))
        sources.update({sid: fold_dir / "features" for sid in fold})
    return assemble_features(sd / "bundle" / "features_oof", sources)


def _criterion(criterion: str) -> str:
    """A threshold criterion of :mod:`monai_wsi_ext.evaluation.calibration`, or exit with its message."""
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.evaluation.calibration import check_criterion

    try:
        return check_criterion(criterion)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from e


def _common_overrides(cfg: dict, seed: int, sd: Path, prepared: Path) -> dict[str, Any]:
    """The overrides every bundle stage of one seed gets (folders, seed, backbone, sizes, ``bundle.overrides``)."""
    b = cfg["bundle"]
    return {"dataset_dir": str(prepared), "output_dir": str(sd / "bundle"), "ckpt_dir": str(sd / "models"),
            "seed": int(seed), "backbone": b["backbone"], "crop_size": int(b["crop_size"]),
            "canvas_size": int(b["canvas_size"]), "num_workers": int(b.get("num_workers", 0)),
            "patch_size": int(cfg["data"]["patch_size"]), **b.get("overrides", {})}


def _predict_specs(cfg: dict, sd: Path) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Method -> (configs, overrides) of its prediction on a split of the prepared folder ``dataset_dir``."""
    models = sd / "models"
    frozen = {"ckpt_dir": str(sd / "models_frozen"), "feature_dir": str(sd / "bundle" / "features_frozen"),
              "pretrained_path": cfg.get("frozen", {}).get("pretrained_path")}
    s = cfg.get("segmentation", {})
    seg = {"ckpt_dir": str(sd / "models_seg"), "seg_downsample": s.get("seg_downsample"),
           "seg_crop_size": int(s.get("seg_crop_size") or 0)}
    return {"classifier": (["inference.json", "baseline_classifier.json"], {}),
            "separate": (["inference.json"], {"mode": "canvas"}),
            "frozen": (["inference.json", "baseline_frozen_features.json"], {"mode": "canvas", **frozen}),
            # predict only (the trainer is built on the training family's folder but not run)
            "segmentation": (["baseline_segmentation.json", "baseline_segmentation_predict.json"], seg),
            "e2e": (["inference.json"], {"mode": "canvas", "encoder_ckpt": str(models / "encoder_e2e.pt"),
                                         "unet_ckpt": str(models / "unet_e2e.pt")})}


def _run_seed(cfg: dict, seed: int, root: Path, prepared: Path, truth: Path, timings: dict,
              others: dict[str, tuple[Path, Path]] | None = None) -> dict[str, dict[str, Path]]:
    """Train and predict every method for one seed, on the training family's test split and on the test split of
    every family in ``others`` (family -> (prepared folder, truth manifest)), with the same weights; evaluate
    each heatmap folder against its family's truth. Returns family -> method -> heatmap folder (the training
    family under ``cfg["data"]["family"]``)."""
    sd = root / f"seed_{seed}"
    hm = sd / "heatmaps"
    common = _common_overrides(cfg, seed, sd, prepared)
    methods = cfg["methods"]
    out: dict[str, Path] = {}
    # method -> (configs, overrides) of its prediction on the test split of the prepared folder `dataset_dir`
    predict = _predict_specs(cfg, sd)

    def stage(name: str, configs: list[str], **kw: Any) -> None:
        t = time.perf_counter()
        logger.info("seed %d: %s", seed, name)
        _bundle(configs, **{**common, **kw})
        timings[f"seed {seed}: {name}"] = round(time.perf_counter() - t, 1)

    if {"classifier", "separate", "e2e"} & set(methods):
        e = cfg["encoder"]
        stage("train encoder", ["train_encoder.json"], max_epochs=int(e["max_epochs"]), batch_size=int(e["batch_size"]),
              learning_rate=float(e["learning_rate"]), samples_per_epoch=e.get("samples_per_epoch"),
              **e.get("overrides", {}))
        stage("classifier-only heatmaps", predict["classifier"][0], heatmap_dir=str(hm / "classifier"))
        out["classifier"] = hm / "classifier"
    if {"separate", "e2e"} & set(methods):
        c = cfg["canvas"]
        stage("extract features", ["extract_features.json"])
        canvas_features = {}
        if int(c.get("out_of_fold") or 0):
            canvas_features = {"feature_dir": str(_out_of_fold_features(cfg, sd, prepared, stage))}
        stage("train canvas U-Net", ["train_canvas.json"], max_epochs=int(c["max_epochs"]),
              batch_size=int(c["batch_size"]), samples_per_slide=int(c["samples_per_slide"]),
              learning_rate=float(c["learning_rate"]), **canvas_features, **c.get("overrides", {}))
        stage("separate heatmaps", predict["separate"][0], heatmap_dir=str(hm / "separate"), **predict["separate"][1])
        out["separate"] = hm / "separate"
    if "frozen" in methods:
        c, frozen = cfg["canvas"], {k: v for k, v in predict["frozen"][1].items() if k != "mode"}
        stage("frozen: extract features", ["extract_features.json", "baseline_frozen_features.json"], **frozen)
        stage("frozen: train canvas U-Net", ["train_canvas.json", "baseline_frozen_features.json"],
              max_epochs=int(c["max_epochs"]), batch_size=int(c["batch_size"]),
              samples_per_slide=int(c["samples_per_slide"]), learning_rate=float(c["learning_rate"]), **frozen)
        stage("frozen heatmaps", predict["frozen"][0], heatmap_dir=str(hm / "frozen"), **predict["frozen"][1])
        out["frozen"] = hm / "frozen"
    if "segmentation" in methods:
        s, seg = cfg["segmentation"], predict["segmentation"][1]
        stage("segmentation only: train + predict", ["baseline_segmentation.json"],
              heatmap_dir=str(hm / "segmentation"), max_epochs=int(s["max_epochs"]), batch_size=int(s["batch_size"]),
              samples_per_slide=int(s["samples_per_slide"]), learning_rate=float(s["learning_rate"]), **seg)
        out["segmentation"] = hm / "segmentation"
    if "e2e" in methods:
        e2e = cfg["e2e"]
        subset = _subset_prepared(prepared, sd / "prepared_e2e", int(e2e["n_slides"]))
        stage("end-to-end training", ["train_e2e.json"], dataset_dir=str(subset), max_epochs=int(e2e["max_epochs"]),
              encoder_lr=float(e2e["encoder_lr"]), unet_lr=float(e2e["unet_lr"]), chunk_size=int(e2e["chunk_size"]),
              subset_size=e2e.get("subset_size"))
        stage("end-to-end heatmaps", predict["e2e"][0], heatmap_dir=str(hm / "e2e"), **predict["e2e"][1])
        out["e2e"] = hm / "e2e"
    out = {m: out[m] for m in METHODS if m in out and m in methods}
    train_family = cfg["data"]["family"]
    result: dict[str, dict[str, Path]] = {train_family: out}
    for family, (fam_prepared, _) in (others or {}).items():
        folders = {}
        for method in out:
            configs, kw = predict[method]
            folder = sd / f"heatmaps_{family}" / method
            where = (_predict_dir_overrides(configs, str(fam_prepared)) if method == "segmentation"
                     else {"dataset_dir": str(fam_prepared)})
            stage(f"{method} heatmaps on {family}", configs, heatmap_dir=str(folder), **kw, **where)
            folders[method] = folder
        result[family] = folders
    truths = {train_family: truth, **{f: t for f, (_, t) in (others or {}).items()}}
    for family, folders in result.items():
        for method, folder in folders.items():
            t = time.perf_counter()
            _bundle(["evaluate.json"], heatmap_dir=str(folder), truth_dir=str(truths[family]),
                    output_dir=str(sd / "bundle"))
            name = f"evaluate {method}" if family == train_family else f"evaluate {method} on {family}"
            timings[f"seed {seed}: {name}"] = round(time.perf_counter() - t, 1)
    return result


def _tables_json(families_out: dict, cross: dict | None) -> dict[str, Any]:
    """``results.json``'s ``families`` and ``cross_family`` entries (seeds as string keys)."""
    return {"families": {f: {"summary": v["summary"], "differences": v["differences"],
                             "per_seed": {str(k): r for k, r in v["per_seed"].items()}}
                         for f, v in families_out.items()},
            "cross_family": None if cross is None else {
                "families": cross["families"], "summary": cross["summary"], "differences": cross["differences"],
                "per_seed": {str(k): r for k, r in cross["per_seed"].items()}}}


def _validation_threshold(cfg: dict, root: Path, heatmaps: dict[int, dict[str, dict[str, Path]]],
                          truths: dict[str, Path], criterion: str, timings: dict) -> dict[str, Any]:
    """Rescore every test heatmap at a threshold chosen on the training family's **validation** slides.

    Per seed and method: predict the validation split (``inference.json``, ``split validation``) into
    ``seed_<s>/heatmaps_validation/<method>/``, fit ``calibration.json`` there (``calibrate.json``), evaluate
    every test folder with that calibration (``evaluate.json`` with ``calibration`` and ``metrics_dir``
    ``seed_<s>/metrics_validation_threshold/<family>/<method>/``) and pool the cross-family slides at the same
    threshold. The segmentation baseline predicts through its own config and is not rescored. Writes
    ``results_validation_threshold.md``; returns the ``validation_threshold`` entry of ``results.json``.
    """
    from monai_wsi_ext.evaluation.report import markdown_table, summarize_runs
    from monai_wsi_ext.io.atomic import write_json_atomic, write_text_atomic
    from monai_wsi_ext.testing import cross_family as xf

    train_family = cfg["data"]["family"]
    prepared = root / "prepared"
    per_family: dict[str, dict[int, dict[str, Any]]] = {f: {} for f in truths}
    cross_per_seed: dict[int, dict[str, Any]] = {}
    calibrations: dict[str, dict[str, Any]] = {}
    for seed, by_family in heatmaps.items():
        sd = root / f"seed_{seed}"
        common, specs = _common_overrides(cfg, seed, sd, prepared), _predict_specs(cfg, sd)
        methods = [m for m in by_family[train_family] if m != "segmentation"]
        calibrations[str(seed)] = {}
        for method in methods:
            t = time.perf_counter()
            configs, kw = specs[method]
            val_dir = sd / "heatmaps_validation" / method
            logger.info("seed %d: %s heatmaps on the validation slides, threshold by %s", seed, method, criterion)
            _bundle(configs, **{**common, **kw, "heatmap_dir": str(val_dir), "split": "validation"})
            _bundle(["calibrate.json"], **{**common, "heatmap_dir": str(val_dir), "criterion": criterion})
            calibration = val_dir / "calibration.json"
            record = json.loads(calibration.read_text())
            calibrations[str(seed)][method] = record
            metrics_dirs = {}
            for family, folders in by_family.items():
                metrics_dirs[family] = sd / "metrics_validation_threshold" / family / method
                _bundle(["evaluate.json"], heatmap_dir=str(folders[method]), truth_dir=str(truths[family]),
                        output_dir=str(sd / "bundle"), metrics_dir=str(metrics_dirs[family]),
                        calibration=str(calibration))
                per_family[family].setdefault(seed, {})[method] = json.loads(
                    (metrics_dirs[family] / "metrics_overall.json").read_text())
            others = [f for f in by_family if f != train_family]
            if others:
                pooled = xf.pooled_metrics({f: by_family[f][method] for f in others}, record["threshold"],
                                           {f: metrics_dirs[f] for f in others})
                write_json_atomic(sd / "metrics_validation_threshold" / "pooled_cross_family" / method
                                  / "metrics_overall.json", pooled)
                cross_per_seed.setdefault(seed, {})[method] = pooled
            timings[f"seed {seed}: {method} validation threshold"] = round(time.perf_counter() - t, 1)
    methods = [m for m in cfg["methods"] if m != "segmentation"]
    families_out = {f: {**xf.family_table(v, methods), "per_seed": v} for f, v in per_family.items()}
    cross = ({"families": [f for f in truths if f != train_family], **xf.family_table(cross_per_seed, methods),
              "per_seed": cross_per_seed} if cross_per_seed else None)
    thresholds = "; ".join(f"seed {s}: " + ", ".join(f"{m} {r['threshold']:.3f}" for m, r in c.items())
                           for s, c in calibrations.items())
    caption = (f"Thresholds chosen on the validation slides of `{train_family}` by {criterion} ({thresholds}); "
               "ranking measures (PR-AUC, ROC-AUC) do not depend on the threshold and equal results.md's.")
    if cross is None and len(truths) == 1:
        md = markdown_table(summarize_runs(per_family[train_family], methods), caption=caption)
    else:
        md = xf.results_markdown(train_family, list(truths), families_out, cross, caption,
                                 threshold_text=f"the threshold chosen on the validation slides (by {criterion})")
    write_text_atomic(root / "results_validation_threshold.md", md)
    print("\n" + md)
    return {"criterion": criterion, "calibration": calibrations, **_tables_json(families_out, cross),
            "table_md": str(root / "results_validation_threshold.md")}


def run(output_dir: str = "experiment_output", preset: str = "paper_comparison", quick: bool = False,
        seeds: Any = None, methods: Any = None, n_train: int | None = None, n_val: int | None = None,
        n_test: int | None = None, size: int | None = None, data_seed: int | None = None,
        tumor_points: int | None = None, normal_looking_tumor_fraction: float | None = None,
        generator: dict | None = None, encoder_epochs: int | None = None, canvas_epochs: int | None = None,
        seg_epochs: int | None = None, e2e_epochs: int | None = None, e2e_slides: int | None = None,
        pretrained_path: str | None = None, threads: int | None = None, figure: str | None = None,
        table: str | None = None, max_figure_slides: int = 3, log_level: str = "INFO", family: str | None = None,
        test_families: Any = None, read_mpp: float | None = None, validation_threshold: str | None = None) -> dict:
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
        family: training slide family (``synthetic``, ``texture``, ``cells``; preset ``data.family``), or a mix
            trained on together, ``"synthetic+cells"`` (each family's splits generated, one prepared folder).
        test_families: families whose test split every method predicts, e.g. ``"synthetic,texture,cells"``
            (preset ``test_families``; the training family is always included).
        read_mpp: common read resolution in µm/px (preset ``data.read_mpp``; 0.5 when testing on other families).
        validation_threshold: also rescore every table at a threshold chosen on the validation slides by this
            criterion (``accuracy`` or ``balanced_accuracy``; preset ``validation_threshold``; None: 0.5 only);
            writes ``results_validation_threshold.md`` and ``results.json``'s ``validation_threshold``.

    Returns:
        The results (also in ``results.json``; with other test families also ``families``, the per-family
        summaries, and ``cross_family``, the pooled one).
    """
    import numpy as np
    import torch

    from monai_wsi_ext.evaluation.report import comparison_figure, markdown_table, summarize_runs
    from monai_wsi_ext.io.atomic import write_json_atomic
    from monai_wsi_ext.testing import cross_family as xf
    from monai_wsi_ext.utils import json_clean, setup_logging

    setup_logging(log_level)
    overrides = dict(seeds=seeds, methods=methods, n_train=n_train, n_val=n_val, n_test=n_test, size=size,
                     data_seed=data_seed, tumor_points=tumor_points,
                     normal_looking_tumor_fraction=normal_looking_tumor_fraction, generator=generator,
                     encoder_epochs=encoder_epochs, canvas_epochs=canvas_epochs, seg_epochs=seg_epochs,
                     e2e_epochs=e2e_epochs, e2e_slides=e2e_slides, pretrained_path=pretrained_path, family=family,
                     test_families=test_families, read_mpp=read_mpp, validation_threshold=validation_threshold)
    preset_name = "quick" if quick else preset
    cfg = _merge(load_preset(preset_name), overrides)
    n_threads = _choose_threads(threads)
    torch.set_num_threads(n_threads)
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    d = cfg["data"]
    train_family, test_families = d["family"], cfg["test_families"]
    crossed = test_families != [train_family]
    logger.info("experiment %r: %d/%d/%d %s slides of %d px, seeds %s, methods %s, test families %s, "
                "%d torch thread(s)", preset_name, d["n_train"], d["n_val"], d["n_test"], train_family, d["size"],
                cfg["seeds"], cfg["methods"], test_families, n_threads)
    manifests = {train_family: xf.generate_training_set(root, train_family, d, cfg["family_kwargs"])}
    prepared = {train_family: root / "prepared"}
    for fam in test_families:
        if fam != train_family:
            manifests[fam] = xf.generate_family(root / f"data_{fam}", fam, d, cfg["family_kwargs"].get(fam))
            prepared[fam] = root / f"prepared_{fam}"
    timings["generate slides"] = round(time.perf_counter() - t0, 1)
    t = time.perf_counter()
    for fam in test_families:
        xf.prepare_family(manifests[fam], prepared[fam], d)
    cell_um = xf.check_cell_size(prepared) if crossed or d.get("read_mpp") is not None else None
    timings["prepare"] = round(time.perf_counter() - t, 1)
    others = {f: (prepared[f], manifests[f]) for f in test_families if f != train_family}
    heatmaps: dict[int, dict[str, dict[str, Path]]] = {}
    for seed in cfg["seeds"]:
        heatmaps[int(seed)] = _run_seed(cfg, int(seed), root, prepared[train_family], manifests[train_family],
                                        timings, others)
    per_family = {fam: {seed: {m: json.loads((p / "metrics_overall.json").read_text()) for m, p in hm[fam].items()}
                        for seed, hm in heatmaps.items()} for fam in test_families}
    per_seed = per_family[train_family]
    summary_rows = summarize_runs(per_seed, cfg["methods"])
    cross = None
    if others:
        cross_per_seed = {}
        for seed, hm in heatmaps.items():
            cross_per_seed[seed] = {}
            for method in hm[train_family]:
                pooled = xf.pooled_metrics({f: hm[f][method] for f in others})
                write_json_atomic(root / f"seed_{seed}" / "pooled_cross_family" / method / "metrics_overall.json",
                                  pooled)
                cross_per_seed[seed][method] = pooled
        cross = {"families": list(others), **xf.family_table(cross_per_seed, cfg["methods"]),
                 "per_seed": cross_per_seed}
    families_out = {fam: {**xf.family_table(per_family[fam], cfg["methods"]), "per_seed": per_family[fam]}
                    for fam in test_families}
    total = time.perf_counter() - t0
    command = "python scripts/run_experiment.py run " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    pretrained = cfg.get("frozen", {}).get("pretrained_path")
    frozen_desc = f"backbone weights {pretrained}" if pretrained else "seeded random encoder"
    if crossed:
        kws = {f: xf.family_generator_kwargs(f, d, cfg["family_kwargs"].get(f), f == train_family)
               for f in {*test_families[1:], *xf.family_components(train_family)}}
        per = " per family" if "+" in train_family else ""
        caption = (f"Trained on `{train_family}` ({d['n_train']} training, {d['n_val']} validation slides{per}), "
                   f"{d['n_test']} test slides per family; {d['size']} px slides at the read resolution "
                   f"{d['read_mpp']} µm/px, {d['patch_size']} px cells = {cell_um:.1f} µm on every family; "
                   f"generator settings {json.dumps(kws, sort_keys=True)}; seeds {cfg['seeds']}; methods "
                   f"{cfg['methods']}; {total / 60:.0f} min on {os.cpu_count()} CPU core(s), {n_threads} torch "
                   "thread(s).")
        md = xf.results_markdown(train_family, test_families, families_out, cross, caption)
    else:
        caption = (f"{d['n_test']} test slides ({d['n_train']} training, {d['n_val']} validation; {d['size']} px, "
                   f"{d['patch_size']} px patches; generator {json.dumps(d.get('generator', {}), sort_keys=True)}), "
                   f"seeds {cfg['seeds']}; mean ± sd over seeds; frozen features: {frozen_desc}; end-to-end: "
                   f"{cfg['e2e']['max_epochs']} epoch(s) on {cfg['e2e']['n_slides']} training slide(s); "
                   f"{total / 60:.0f} min on {os.cpu_count()} CPU core(s), {n_threads} torch thread(s).")
        md = markdown_table(summary_rows, caption=caption)
    (root / "results.md").write_text(md)
    first = int(cfg["seeds"][0])
    fig = comparison_figure(heatmaps[first][train_family], root / "figure.png", prepared_dir=prepared[train_family],
                            max_slides=max_figure_slides)
    family_figures = {fam: str(comparison_figure(heatmaps[first][fam], root / f"figure_{fam}.png",
                                                 prepared_dir=prepared[fam], max_slides=max_figure_slides))
                      for fam in others}
    results = {"preset": preset_name, "config": cfg, "command": command, "threads": n_threads,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "numpy": np.__version__},
               "summary": summary_rows, "per_seed": {str(k): v for k, v in per_seed.items()},
               "train_family": train_family, "test_families": test_families, "cell_um": cell_um,
               **_tables_json(families_out, cross), "timings_s": timings, "total_s": round(total, 1),
               "table_md": str(root / "results.md"),
               "figure": str(fig), "family_figures": family_figures}
    write_json_atomic(root / "results.json", json_clean(results))
    if cfg.get("validation_threshold"):
        truths = {train_family: manifests[train_family], **{f: t for f, (_, t) in others.items()}}
        results["validation_threshold"] = _validation_threshold(cfg, root, heatmaps, truths,
                                                                cfg["validation_threshold"], timings)
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


def threshold(output_dir: str, criterion: str = "accuracy", threads: int | None = None,
              log_level: str = "INFO") -> None:
    """Rescore a finished run (``run``'s ``output_dir``) at thresholds chosen on its validation slides.

    The same step as ``run --validation_threshold <criterion>``, on the trained models and test heatmaps already
    there: writes ``results_validation_threshold.md`` and adds ``validation_threshold`` to ``results.json``.
    """
    import torch

    from monai_wsi_ext.io.atomic import write_json_atomic
    from monai_wsi_ext.utils import json_clean, setup_logging

    setup_logging(log_level)
    _criterion(criterion)
    root = Path(output_dir).resolve()
    try:
        results = json.loads((root / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {root / 'results.json'} is not a finished run's results ({e})") from e
    torch.set_num_threads(_choose_threads(threads))
    cfg = results["config"]
    train_family = cfg["data"]["family"]
    families = results.get("test_families") or [train_family]
    truths = {f: root / ("data" if f == train_family else f"data_{f}") / "manifest.json" for f in families}
    heatmaps = {int(seed): {f: {m: root / f"seed_{seed}" / ("heatmaps" if f == train_family else f"heatmaps_{f}") / m
                                for m in cfg["methods"]} for f in families} for seed in cfg["seeds"]}
    timings: dict[str, float] = {}
    results["validation_threshold"] = _validation_threshold(cfg, root, heatmaps, truths, criterion, timings)
    results["validation_threshold"]["timings_s"] = timings
    write_json_atomic(root / "results.json", json_clean(results))


if __name__ == "__main__":
    fire.Fire({"run": _cli_run, "threshold": threshold})
