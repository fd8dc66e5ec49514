"""Cross-family experiments: train on one slide family, test on every family (issue 11).

Helpers of ``scripts/run_experiment.py`` for presets with ``"data": {"family": ...}`` and ``"test_families"``:

* :func:`family_generator_kwargs` / :func:`generate_family`: one family's dataset at the experiment's common
  physical cell size. The read resolution is ``data.read_mpp`` (µm/px, e.g. 0.5) and the cell is
  ``patch_size`` px at it (64 px at 0.5 µm/px = 32 µm on every family): ``synthetic`` and ``texture`` slides are
  written at ``read_mpp``; ``cells`` slides have their field laid out at ``grid_mpp = read_mpp`` (so their
  ambiguity, sized in grid cells, is sized in the same 32 µm cells) and cycle through ``mpps`` (default
  ``(read_mpp / 2, read_mpp)``: every slide has a pyramid level at ``read_mpp``).
* :func:`family_components` / :func:`generate_training_set`: a training set of several families
  (``data.family: ["synthetic", "cells"]``, named ``"synthetic+cells"``): each family's train/val/test splits are
  generated into ``data_<family>/`` and one merged ``manifest.json`` lists them all with the slide ids prefixed by
  the family (``cells_train_000``), so one prepared folder holds the mix and the in-family table is the mix's
  test slides; a family of the mix cannot also be a cross-family test family.
* :func:`prepare_family`: ``prepare_dataset`` with ``PrepareConfig.target_mpp = read_mpp``;
  :func:`cell_sizes_um` / :func:`check_cell_size` check that every prepared slide's cell is the same µm.
* :func:`pooled_metrics`: the metrics of several heatmap folders (test slides of several families) pooled as
  :func:`monai_wsi_ext.evaluation.metrics.summarize` pools the slides of one folder: per-slide numbers from each
  folder's ``metrics_per_slide.json`` (written by ``evaluate.json`` against that family's truth) and the patches
  (probabilities and labels of the tumor/normal cells) from each slide's ``_prob.npy``/``_labels.npy``.
* :func:`difference_rows` / :func:`difference_table`: method minus classifier-only, per seed, then mean ± sd.
* :func:`results_markdown`: the in-family, pooled cross-family and per-family tables of ``results.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DIFF_COLUMNS",
    "family_generator_kwargs",
    "generate_family",
    "family_components",
    "generate_training_set",
    "prepare_family",
    "cell_sizes_um",
    "check_cell_size",
    "pooled_metrics",
    "difference_rows",
    "difference_table",
    "family_table",
    "results_markdown",
]

#: ``metrics_overall.json`` keys of the difference table, headers and display scale
DIFF_COLUMNS = (
    ("pooled_accuracy", "Δ Accuracy (points)", 100.0),
    ("pooled_pr_auc", "Δ PR-AUC (points)", 100.0),
    ("pooled_roc_auc", "Δ ROC-AUC (points)", 100.0),
    ("mean_tumor_points", "Δ Tumor points / slide", 1.0),
    ("mean_dice", "Δ Dice (points)", 100.0),
)


def family_generator_kwargs(family: str, data: Mapping[str, Any], family_kwargs: Mapping[str, Any] | None = None,
                            training: bool = False) -> dict[str, Any]:
    """Keyword arguments of :func:`monai_wsi_ext.testing.families.generate_family_dataset` for ``family``.

    Sizes come from ``data`` (``size``: slide side in pixels at the read resolution; ``patch_size``; ``read_mpp``,
    None: the families' own defaults, as before cross-family runs existed), then ``data["generator"]`` when
    ``family`` is the training family (the preset's historic generator settings), then ``family_kwargs``.

    Args:
        family: ``synthetic``, ``texture`` or ``cells``.
        data: the preset's ``data`` section.
        family_kwargs: this family's settings (``preset["family_kwargs"][family]``).
        training: ``family`` is the training family.

    Returns:
        The keyword arguments (without ``n_*``/``seed``).
    """
    size, patch = int(data["size"]), int(data["patch_size"])
    read_mpp = data.get("read_mpp")
    kw: dict[str, Any] = {"width": size, "height": size, "patch_size": patch}
    if family == "cells":
        if read_mpp is not None:
            kw["grid_mpp"] = float(read_mpp)
            kw["mpps"] = [float(read_mpp) / 2, float(read_mpp)]
    elif read_mpp is not None:
        kw["mpp"] = float(read_mpp)
    if training:
        kw.update(data.get("generator") or {})
    kw.update(dict(family_kwargs or {}))
    if "mpps" in kw:
        kw["mpps"] = tuple(float(m) for m in kw["mpps"])
    return kw


def generate_family(out_dir: str | Path, family: str, data: Mapping[str, Any],
                    family_kwargs: Mapping[str, Any] | None = None, training: bool = False) -> Path:
    """Generate one family's dataset; a test-only family gets its test split only.

    Returns:
        The ``manifest.json`` path.
    """
    from monai_wsi_ext.testing.families import generate_family_dataset

    kw = family_generator_kwargs(family, data, family_kwargs, training)
    n_train, n_val = (int(data["n_train"]), int(data["n_val"])) if training else (0, 0)
    return generate_family_dataset(out_dir, family, n_train=n_train, n_val=n_val, n_test=int(data["n_test"]),
                                   seed=int(data["data_seed"]), **kw)


def family_components(family: str | Sequence[str]) -> list[str]:
    """The families of a training set: ``"synthetic"`` -> ``["synthetic"]``; ``"synthetic+cells"`` or
    ``["synthetic", "cells"]`` -> ``["synthetic", "cells"]`` (order kept, repeats dropped)."""
    names = family.split("+") if isinstance(family, str) else [str(f) for f in family]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no slide family in {family!r}")
    return list(dict.fromkeys(names))


def generate_training_set(root: str | Path, family: str, data: Mapping[str, Any],
                          family_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """The training family's dataset: one family into ``root/data`` as before, or a mix of families (``"a+b"``).

    A mix generates every family's train/val/test splits (``data["n_train"]``, ``n_val``, ``n_test`` slides each)
    into ``root/data_<family>/`` and writes ``root/data/manifest.json`` listing all their slides, ids prefixed with
    the family (``<family>_<id>``; paths relative to the merged manifest, each record's ``family`` kept). The
    preset's ``data.generator`` holds one family's settings, so a mix takes its settings from ``family_kwargs``
    only.

    Returns:
        The (merged) ``manifest.json`` path.

    Raises:
        SystemExit: ``data.generator`` is set for a mix.
    """
    from monai_wsi_ext.io.atomic import write_json_atomic

    root, family_kwargs = Path(root), family_kwargs or {}
    parts = family_components(family)
    if len(parts) == 1:
        return generate_family(root / "data", parts[0], data, family_kwargs.get(parts[0]), training=True)
    if data.get("generator"):
        raise SystemExit(f"error: `data.generator` holds one family's settings; for the mix {family!r} put each "
                         "family's settings under `family_kwargs.<family>`")
    merged_dir = root / "data"
    merged_dir.mkdir(parents=True, exist_ok=True)
    slides, splits, configs = [], {}, {}
    for fam in parts:
        manifest = generate_family(root / f"data_{fam}", fam, data, family_kwargs.get(fam), training=True)
        meta = json.loads(manifest.read_text())
        configs[fam] = meta.get("config")
        for rec in meta["slides"]:
            rec = dict(rec)
            for key in ("image", "asap_xml", "geojson", "truth", "mask", "annotation"):
                if rec.get(key) and not Path(rec[key]).is_absolute():
                    rec[key] = os.path.relpath(manifest.parent / rec[key], merged_dir)
            rec["id"], rec["family"] = f"{fam}_{rec['id']}", rec.get("family", fam)
            splits.setdefault(rec.get("split", "train"), []).append(rec["id"])
            slides.append(rec)
    out = merged_dir / "manifest.json"
    write_json_atomic(out, {"name": f"mix of {', '.join(parts)}", "families": parts, "seed": int(data["data_seed"]),
                            "config": configs, "splits": splits, "slides": slides})
    return out


def prepare_family(manifest: str | Path, out_dir: str | Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """``prepare_dataset`` of one family's manifest at ``data["read_mpp"]`` (None: level 0, the old behaviour).

    Returns:
        ``prepare_dataset``'s summary.

    Raises:
        SystemExit: when a slide failed.
    """
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset

    read_mpp = data.get("read_mpp")
    cfg = PrepareConfig(patch_size=int(data["patch_size"]), thumbnail_max_size=1024,
                        target_mpp=float(read_mpp) if read_mpp is not None else None)
    summary = prepare_dataset(collect_inputs(manifest=manifest), Path(out_dir), cfg, progress=False)
    if summary["failed"]:
        raise SystemExit(f"error: preparation of {manifest} failed for {summary['failed']}")
    return summary


def cell_sizes_um(prepared_dir: str | Path) -> dict[str, float]:
    """Slide id -> side of its grid cell in µm (``cell_size`` level-0 px times the level-0 mpp) of a prepared
    folder."""
    out = {}
    for meta_path in sorted(Path(prepared_dir).glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        out[meta["slide_id"]] = float(meta["cell_size"]) * float(meta["mpp"])
    return out


def check_cell_size(prepared: Mapping[str, str | Path], rtol: float = 0.02) -> float:
    """The common cell side in µm of the prepared folders of every family.

    Args:
        prepared: family -> prepared folder.
        rtol: allowed relative difference.

    Raises:
        SystemExit: when a slide's cell differs (naming it), or a folder has no slide.
    """
    sizes = {f"{fam}/{sid}": um for fam, folder in prepared.items() for sid, um in cell_sizes_um(folder).items()}
    if not sizes:
        raise SystemExit(f"error: no prepared slide in {dict(prepared)}")
    ref = float(np.median(list(sizes.values())))
    off = {k: round(v, 3) for k, v in sizes.items() if abs(v - ref) > rtol * ref}
    if off:
        raise SystemExit(f"error: the grid cell must be the same size in µm on every family (median {ref:.3f} µm); "
                         f"these slides differ: {off}. Set data.read_mpp and the families' mpp settings so that "
                         "every slide has a pyramid level at read_mpp.")
    return ref


def _slide_patches(folder: Path) -> dict[str, dict[str, list]]:
    from monai_wsi_ext.evaluation import metrics as M
    from monai_wsi_ext.evaluation.report import load_heatmap_dir

    out = {}
    for s in load_heatmap_dir(folder):
        keep = (s.labels == M.LABEL_TUMOR) | (s.labels == M.LABEL_NORMAL)
        out[s.slide_id] = {"probs": s.prob[keep], "labels": s.labels[keep]}
    return out


def pooled_metrics(folders: Mapping[str, str | Path], threshold: float = 0.5,
                   metrics_dirs: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Metrics of the test slides of several heatmap folders pooled (all their patches together).

    Args:
        folders: name (e.g. the family) -> heatmap folder already evaluated by ``evaluate.json`` (its
            ``metrics_per_slide.json`` is read).
        threshold: tumor where ``prob > threshold``.
        metrics_dirs: name -> the folder of that evaluation's ``metrics_per_slide.json`` when it is not the heatmap
            folder (``evaluate.json``'s ``metrics_dir``; it must have been evaluated at ``threshold``).

    Returns:
        :func:`~monai_wsi_ext.evaluation.metrics.summarize`'s keys (``pooled_*`` over every patch of every slide,
        ``mean_*`` over slides, ``slide_auc``, ...) plus ``total_tumor_points``, ``froc`` (NaN: not pooled) and
        ``sources`` (name -> folder and slide ids); per-slide ids are ``<name>/<slide_id>``.
    """
    from monai_wsi_ext.evaluation import metrics as M
    from monai_wsi_ext.utils import json_clean

    per_slide, sources = [], {}
    for name, folder in folders.items():
        folder = Path(folder)
        rows = json.loads((Path((metrics_dirs or {}).get(name, folder)) / "metrics_per_slide.json").read_text())
        patches = _slide_patches(folder)
        missing = sorted({r["slide_id"] for r in rows} - set(patches))
        if missing:
            raise SystemExit(f"error: {folder}: metrics_per_slide.json lists slides without a heatmap: {missing}")
        for r in rows:
            per_slide.append({**r, "slide_id": f"{name}/{r['slide_id']}", M.PATCHES_KEY: patches[r["slide_id"]]})
        sources[name] = {"heatmap_dir": str(folder), "slides": [r["slide_id"] for r in rows]}
    out = M.summarize(per_slide, threshold)
    out["threshold"] = float(threshold)
    out["total_tumor_points"] = int(sum(int(r["tumor_points"]) for r in per_slide))
    out["froc"] = float("nan")
    out["sources"] = sources
    return json_clean(out)


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def difference_rows(per_seed: Mapping[Any, Mapping[str, Mapping[str, Any]]], methods: Sequence[str],
                    baseline: str = "classifier") -> list[dict[str, Any]]:
    """Method minus ``baseline`` per seed (same seed), then mean and sd over seeds.

    Args:
        per_seed: ``{seed: {method: metrics_overall}}``.
        methods: methods in table order (the baseline is skipped).
        baseline: the method subtracted.

    Returns:
        One row per method: ``method``, ``label``, ``n_seeds`` and per :data:`DIFF_COLUMNS` key ``{"mean", "sd",
        "values", "better"}`` (``better``: seeds in which the method beats the baseline; fewer tumor points is
        better). Empty without the baseline.
    """
    from monai_wsi_ext.evaluation.report import METHOD_LABELS

    rows = []
    for method in methods:
        if method == baseline:
            continue
        pairs = [(runs[method], runs[baseline]) for runs in per_seed.values() if method in runs and baseline in runs]
        if not pairs:
            continue
        row: dict[str, Any] = {"method": method, "label": f"{METHOD_LABELS.get(method, method)} − classifier",
                               "n_seeds": len(pairs)}
        for key, _, _ in DIFF_COLUMNS:
            vals = [float(a[key]) - float(b[key]) for a, b in pairs if _finite(a.get(key)) and _finite(b.get(key))]
            arr = np.asarray(vals, np.float64)
            better = int(np.sum(arr < 0)) if key == "mean_tumor_points" else int(np.sum(arr > 0))
            row[key] = {"mean": float(arr.mean()) if arr.size else float("nan"),
                        "sd": float(arr.std(ddof=1)) if arr.size > 1 else float("nan"), "values": vals,
                        "better": better}
        rows.append(row)
    return rows


def _cell(stat: Mapping[str, Any], scale: float, signed: bool = False) -> str:
    mean, sd = stat["mean"], stat["sd"]
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:+.2f}" if signed else f"{mean * scale:.2f}"
    return text + (f" ± {sd * scale:.2f}" if math.isfinite(sd) else "")


def difference_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`difference_rows` (``mean ± sd`` and the seeds in which the method is better)."""
    head = "| Difference | " + " | ".join(h for _, h, _ in DIFF_COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(DIFF_COLUMNS)]
    for row in rows:
        cells = [f"{_cell(row[k], s, True)} ({row[k]['better']}/{len(row[k]['values'])})" if row[k]["values"]
                 else "n/a" for k, _, s in DIFF_COLUMNS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family_table(per_seed: Mapping[Any, Mapping[str, Mapping[str, Any]]], methods: Sequence[str]) -> dict[str, Any]:
    """Summary rows (:func:`~monai_wsi_ext.evaluation.report.summarize_runs`), difference rows and their Markdown."""
    from monai_wsi_ext.evaluation.report import markdown_table, summarize_runs

    summary = summarize_runs(per_seed, methods)
    diffs = difference_rows(per_seed, methods)
    md = markdown_table(summary)
    if diffs:
        md += "\n" + difference_table(diffs)
    return {"summary": summary, "differences": diffs, "markdown": md}


def _slides_text(per_seed: Mapping[Any, Mapping[str, Mapping[str, Any]]]) -> str:
    for runs in per_seed.values():
        for overall in runs.values():
            n, n_tumor = overall.get("pooled_n"), overall.get("pooled_n_tumor")
            base = f"; calling every patch normal scores {100 * (1 - n_tumor / n):.2f} % accuracy" if n else ""
            return (f"{overall.get('n_slides', '?')} test slide(s), {n} labelled patches ({n_tumor} tumor){base}")
    return "no slides"


def results_markdown(train_family: str, test_families: Sequence[str],
                     families: Mapping[str, Mapping[str, Any]], cross: Mapping[str, Any] | None,
                     caption: str, threshold_text: str = "threshold 0.5") -> str:
    """``results.md`` of a cross-family run: in-family table, pooled cross-family table, one table per family.

    Args:
        train_family: the training family.
        test_families: the test families in order.
        families: family -> ``{"per_seed", "markdown", ...}`` (:func:`family_table` plus ``per_seed``).
        cross: the pooled cross-family entry (same keys) or None when every test family is the training family.
        caption: the run's description (sizes, seeds, time).
        threshold_text: where accuracy, tumor points and Dice are cut (the header's "Accuracy at ...").
    """
    parts = [f"# Cross-family results: trained on `{train_family}`\n",
             "Mean ± sd over seeds; differences are per seed (same seed), then mean ± sd, with the number of seeds "
             "in which the method beats the classifier in brackets (fewer tumor points is better). Accuracy at "
             f"{threshold_text}; PR-AUC is average precision; tumor points are isolated predicted-tumor components "
             "entirely in ground-truth normal tissue, per slide.\n"]
    if train_family in families:
        f = families[train_family]
        parts.append(f"## In-family: test on `{train_family}`\n\n{_slides_text(f['per_seed'])}.\n\n{f['markdown']}")
    if cross is not None:
        names = ", ".join(f"`{n}`" for n in cross["families"])
        parts.append(f"## Cross-family, pooled: test on {names}\n\nAll test slides of the families other than the "
                     f"training family, patches pooled ({_slides_text(cross['per_seed'])}); FROC is not pooled.\n\n"
                     f"{cross['markdown']}")
    for fam in test_families:
        if fam == train_family:
            continue
        f = families[fam]
        parts.append(f"## Test family `{fam}`\n\n{_slides_text(f['per_seed'])}.\n\n{f['markdown']}")
    parts.append(caption + "\n")
    return "\n".join(parts)
