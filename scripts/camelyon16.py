"""Camelyon16 recipe helpers: a dataset manifest for the official files, and a stand-in run of every recipe step.

Examples:
    # manifest with training/validation/test splits; slides without annotation get an empty ASAP file (negative)
    python scripts/camelyon16.py manifest --images camelyon16/images --annotations camelyon16/annotations \\
        --output camelyon16/manifest.json
    # tissue, patch grids and labels with the settings of configs/datasets/camelyon16.json
    python scripts/camelyon16.py prepare --manifest camelyon16/manifest.json
    # every step of the recipe on a generated stand-in slide carrying the real Tumor_107 annotation
    python scripts/camelyon16.py standin --output_dir camelyon16_standin

The stand-in cannot be a real Camelyon16 slide (those are 1e5 px wide and not redistributable here). It is a
generated slide (``monai_wsi_ext.testing.synthetic``) covering the bounding box of a real Camelyon16 annotation plus a
margin, with the annotation translated into its frame (``scale=1``: same pixel and micron sizes as the original at
0.243 µm/px; ``scale<1`` shrinks slide and annotation and raises the mpp by ``1/scale`` so that lesion sizes in
microns, which the FROC's ITC rule uses, stay those of the original). The generator's own image content does not
match the annotation: the stand-in checks the plumbing (reading, tissue, labels from the real polygons, the
``camelyon16.json`` settings, inference, heatmap alignment, FROC against the rasterised annotation and against a
Camelyon16-style mask TIFF), not accuracy. The models are random.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
OVERLAY = REPO / "configs" / "datasets" / "camelyon16.json"
SHARED_ANNOTATION = REPO.parent / "shared" / "data" / "annotations" / "camelyon16" / "Tumor_107.xml"
CAMELYON16_MPP = 0.243

__all__ = ["manifest", "prepare", "standin"]

logger = logging.getLogger("camelyon16")

_SLIDE_SUFFIXES = (".tif", ".tiff", ".svs")


def _split_of(stem: str) -> str:
    return "test" if stem.lower().startswith("test") else "training"


def manifest(images: str, annotations: str | None = None, masks: str | None = None,
             output: str = "camelyon16/manifest.json", val_fraction: float = 0.2, seed: int = 0,
             negative_dir: str | None = None, exclude: Any = ("Test_049", "Test_114")) -> str:
    """Write a dataset manifest for the official Camelyon16 files (input of ``scripts/prepare_dataset.py``).

    ``Tumor_*``/``Normal_*`` slides (any case) are split into ``training``/``validation`` (stratified, fraction
    ``val_fraction``, seeded); ``Test_*`` slides are ``test``. Each slide's annotation is ``<stem>.xml`` in
    ``annotations``, else ``<stem>_mask.tif`` (any case, e.g. ``Tumor_001_Mask.tif``) in ``masks``; a slide with
    neither is negative (Camelyon16 annotates every metastasis) and gets an empty ASAP file in ``negative_dir``, so
    that exhaustive labelling marks its tissue normal.

    Args:
        images: folder with every slide (``.tif``).
        annotations: folder with the ASAP XML files.
        masks: folder with mask TIFFs (used when a slide has no XML).
        output: manifest path.
        val_fraction: fraction of the training slides (per class) used for validation.
        seed: seed of the split.
        negative_dir: where the empty annotations go (default: ``<output folder>/negative_annotations``).
        exclude: slide ids left out (default: ``Test_049`` and ``Test_114``, which the organisers' evaluation
            excludes); ``"[]"`` keeps every slide.

    Returns:
        The manifest path.
    """
    from monai_wsi_ext.io.annotations import write_asap_xml
    from monai_wsi_ext.io.atomic import write_json_atomic

    def index(folder: str | None) -> dict[str, Path]:
        return {p.name.lower(): p for p in Path(folder).iterdir() if p.is_file()} if folder else {}

    skip = {str(e).lower() for e in ((exclude,) if isinstance(exclude, str) else (exclude or ()))}
    slides = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in _SLIDE_SUFFIXES
                    and not p.stem.lower().endswith("_mask") and p.stem.lower() not in skip)
    if not slides:
        raise SystemExit(f"error: no .tif slides in {images}")
    ann, msk = index(annotations), index(masks)
    out = Path(output)
    neg_dir = Path(negative_dir) if negative_dir else out.parent / "negative_annotations"
    rng = np.random.default_rng(int(seed))
    train = [p for p in slides if _split_of(p.stem) == "training"]
    val: set[str] = set()
    for prefix in ("tumor", "normal"):
        group = [p.stem for p in train if p.stem.lower().startswith(prefix)]
        k = int(round(float(val_fraction) * len(group)))
        val.update(rng.choice(group, size=k, replace=False).tolist() if k else [])
    records = []
    for p in slides:
        stem = p.stem
        ref = ann.get(f"{stem.lower()}.xml") or msk.get(f"{stem.lower()}_mask.tif") or msk.get(
            f"{stem.lower()}_mask.tiff")
        negative = ref is None
        if negative:
            ref = write_asap_xml(neg_dir / f"{stem}.xml", [])
        split = "validation" if stem in val else _split_of(stem)
        records.append({"id": stem, "image": str(p.resolve()), "annotation": str(Path(ref).resolve()),
                        "split": split, "negative": negative})
    data = {"name": "Camelyon16", "mpp": CAMELYON16_MPP, "slides": records,
            "splits": {s: [r["id"] for r in records if r["split"] == s] for s in ("training", "validation", "test")}}
    write_json_atomic(out, data)
    counts = {s: len(v) for s, v in data["splits"].items()}
    print(f"{len(records)} slides -> {out}: {counts}; {sum(r['negative'] for r in records)} without annotation "
          f"(empty annotations in {neg_dir})")
    return str(out)


def _overlay_prepare_config(**overrides: Any):
    """The :class:`~monai_wsi_ext.prep.prepare.PrepareConfig` of the overlay's ``prepare`` section (with overrides of
    top-level keys such as ``mpp`` or ``patch_size``)."""
    from monai.bundle import ConfigParser

    from monai_wsi_ext.prep.prepare import settings_from_parser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json"), str(OVERLAY)])
    parser.update(overrides)
    return settings_from_parser(parser), parser


def prepare(manifest: str = "camelyon16/manifest.json", output_dir: str | None = None, overwrite: bool = False,
            log_level: str = "INFO") -> None:
    """Tissue, patch grids and labels of every manifest slide with exactly the overlay's ``prepare`` settings
    (256 px at level 0, mpp 0.243, thresholds, exhaustive labels, mask values 1/255 = tumor).

    Args:
        manifest: the manifest written by :func:`manifest`.
        output_dir: prepared folder (default: the overlay's ``dataset_dir``, ``camelyon16/prepared``).
        overwrite: redo slides already prepared.
        log_level: logging level.
    """
    from monai_wsi_ext.prep.prepare import collect_inputs, prepare_dataset
    from monai_wsi_ext.utils import setup_logging

    setup_logging(log_level)
    cfg, parser = _overlay_prepare_config()
    out = output_dir or parser.get_parsed_content("dataset_dir")
    summary = prepare_dataset(collect_inputs(manifest=manifest), out, cfg, overwrite=bool(overwrite))
    print(f"{len(summary['done'])} prepared, {len(summary['skipped'])} unchanged, {len(summary['failed'])} failed "
          f"-> {out}")
    for sid, reason in summary["failed"].items():
        print(f"  FAILED {sid}: {reason}")
    if summary["failed"]:
        raise SystemExit(1)


def _bundle(configs: list[str], **overrides: Any) -> None:
    from monai.bundle import run as bundle_run

    files = [str(CONFIGS / "common.json")] + [str(CONFIGS / c) for c in configs] + [str(OVERLAY)]
    bundle_run(config_file=files, meta_file=str(CONFIGS / "metadata.json"),
               logging_file=str(CONFIGS / "logging.conf"), **overrides)


def _write_mask_tiff(path: Path, tumor: np.ndarray, min_size: int = 256) -> Path:
    """A Camelyon16-style mask TIFF (uint8, 255 = tumor), one page per pyramid level (2x steps)."""
    import tifffile

    from monai_wsi_ext.io.atomic import atomic_path

    levels = [np.where(tumor, 255, 0).astype(np.uint8)]
    while min(levels[-1].shape) > min_size:
        levels.append(levels[-1][::2, ::2])
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for i, lev in enumerate(levels):
                tif.write(lev, tile=(256, 256), compression="zlib", subfiletype=0 if i == 0 else 1,
                          photometric="minisblack", metadata=None)
    return path


def standin(output_dir: str = "camelyon16_standin", annotation: str = str(SHARED_ANNOTATION), scale: float = 1.0,
            margin_um: float = 500.0, seed: int = 0, normal_size: int = 4096, patch_size: int | None = None,
            threads: int | None = None, log_level: str = "INFO") -> dict:
    """Run every step of the Camelyon16 recipe on a generated stand-in slide with a real Camelyon16 annotation.

    Steps: generate a tumor stand-in (covering the annotation's bounding box plus ``margin_um``) and a small
    negative slide; write the translated annotation (ASAP XML) and a Camelyon16-style mask TIFF from it; build the
    manifest (:func:`manifest`); prepare both slides with the ``prepare`` settings of
    ``configs/datasets/camelyon16.json``; save random (seeded) encoder and U-Net weights; run ``inference.json``
    with the overlay; evaluate with ``evaluate.json`` against the XML and against the mask TIFF (lesion FROC,
    slide classes). Writes ``standin_report.json``.

    Args:
        output_dir: output folder.
        annotation: a Camelyon16 ASAP XML (default: ``../shared/data/annotations/camelyon16/Tumor_107.xml``).
        scale: stand-in pixels per original pixel (1: full size; tests use 0.25).
        margin_um: tissue margin around the annotation's bounding box, in microns.
        seed: seed of the generator and the random weights.
        normal_size: side of the negative slide at ``scale=1`` (scaled like the tumor stand-in).
        patch_size: override the overlay's 256 px patches (None keeps it).
        threads: torch CPU threads (None: torch's default).
        log_level: logging level.

    Returns:
        The report (also written to ``standin_report.json``).
    """
    import torch

    from monai_wsi_ext.io.annotations import AnnotationPolygon, read_annotations, rasterize_annotations, write_asap_xml
    from monai_wsi_ext.baselines.segmentation import frozen_encoder
    from monai_wsi_ext.io.atomic import write_json_atomic
    from monai_wsi_ext.prep.prepare import collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide
    from monai_wsi_ext.utils import setup_logging

    setup_logging(log_level)
    if threads:
        torch.set_num_threads(int(threads))
    scale = float(scale)
    if not 0 < scale <= 1:
        raise SystemExit(f"error: `scale` must be in (0, 1], got {scale}")
    out = Path(output_dir).resolve()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    mpp = CAMELYON16_MPP / scale
    ann_path = Path(annotation)
    slide_id = ann_path.stem
    polygons = read_annotations(ann_path)
    pts = np.concatenate([p.exterior for p in polygons] + [h for p in polygons for h in p.holes])
    margin_px = margin_um / CAMELYON16_MPP
    x0, y0 = np.floor(pts.min(axis=0) - margin_px)
    x1, y1 = np.ceil(pts.max(axis=0) + margin_px)
    width, height = int(math.ceil((x1 - x0) * scale)), int(math.ceil((y1 - y0) * scale))

    def move(ring: np.ndarray) -> np.ndarray:
        return (ring - np.array([x0, y0])) * scale

    moved = [AnnotationPolygon(exterior=move(p.exterior), holes=[move(h) for h in p.holes], label=p.label,
                               name=p.name, group=p.group) for p in polygons]
    # 1. slides: the tumor stand-in (one large tissue lump, no generated tumor) and a negative slide
    t = time.perf_counter()
    ps = int(patch_size) if patch_size else 256
    gen = dict(mpp=mpp, patch_size=ps, tumor_regions=0, tumor_points=0, truth_downsample=32)
    slides_dir = out / "images"
    generate_slide(slides_dir / f"{slide_id}.tif", seed, SyntheticSlideConfig(width=width, height=height, n_lumps=1,
                                                                               **gen))
    n_side = max(int(normal_size * scale), 512)
    generate_slide(slides_dir / "Normal_001.tif", seed + 1, SyntheticSlideConfig(width=n_side, height=n_side,
                                                                                 n_lumps=2, **gen))
    for p in slides_dir.glob("*"):  # keep only the images: the generator's own annotations are not the truth here
        if p.suffix != ".tif":
            p.unlink()
    timings["generate"] = round(time.perf_counter() - t, 1)
    # 2. annotations as Camelyon16 ships them: ASAP XML, and a mask TIFF rasterised from it (255 = tumor)
    write_asap_xml(out / "annotations" / f"{slide_id}.xml", moved)
    raster = rasterize_annotations(moved, (height, width), 1.0)
    _write_mask_tiff(out / "masks" / f"{slide_id}_Mask.tif", raster == 2)
    # 3. manifest (the negative slide gets an empty annotation) and preparation with the overlay's settings
    man = manifest(str(slides_dir), annotations=str(out / "annotations"), masks=None,
                   output=str(out / "manifest.json"), val_fraction=0.0)
    data = json.loads(Path(man).read_text())
    for rec in data["slides"]:
        rec["split"] = "test"
    write_json_atomic(out / "manifest.json", data)
    overrides = {"mpp": mpp, **({"patch_size": ps} if patch_size else {})}
    prep_cfg, parser = _overlay_prepare_config(**overrides)
    t = time.perf_counter()
    summary = prepare_dataset(collect_inputs(manifest=out / "manifest.json"), out / "prepared", prep_cfg,
                              progress=False)
    timings["prepare"] = round(time.perf_counter() - t, 1)
    if summary["failed"]:
        raise SystemExit(f"error: preparation failed: {summary['failed']}")
    # 4. random (seeded) weights in the checkpoint layout the bundle reads
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    enc = frozen_encoder(seed, backbone=parser.get_parsed_content("backbone"),
                         feature_dim=parser.get_parsed_content("feature_dim"))
    torch.save(enc.state_dict(), models / "encoder.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = parser.get_parsed_content("unet_def", instantiate=True)
    torch.save(unet.state_dict(), models / "unet.pt")
    # 5. inference with the overlay, 6. evaluation against the XML and against the mask TIFF
    common = {"dataset_dir": str(out / "prepared"), "output_dir": str(out / "bundle"), "ckpt_dir": str(models),
              **overrides}
    t = time.perf_counter()
    _bundle(["inference.json"], heatmap_dir=str(out / "heatmaps"), split="test", **common)
    timings["inference"] = round(time.perf_counter() - t, 1)
    results = {}
    for truth in ("annotations", "masks"):
        _bundle(["evaluate.json"], heatmap_dir=str(out / "heatmaps"), truth_dir=str(out / truth),
                metrics_dir=str(out / f"metrics_{truth}"), **common)
        results[truth] = json.loads((out / f"metrics_{truth}" / "metrics_overall.json").read_text())
    # 7. encoder throughput alone (reading + 224 px crops + GoogLeNet features), the number behind the runtime
    # estimate of a real slide in the docs
    from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.model.predict import encode_slide

    meta = next(m for m in load_prepared_slides(out / "prepared") if m.slide_id == slide_id)
    source = SlidePatchSource.from_prepared(meta, make_patch_transform(False, parser.get_parsed_content("crop_size")))
    enc.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    feats, _ = encode_slide(enc, source, batch_size=64, device="cpu", channels_last=True)
    enc_seconds = time.perf_counter() - t
    source.close()
    inf = json.loads((out / "heatmaps" / "inference_summary.json").read_text())
    n_patches = sum(v["n_patches"] for v in inf["slides"].values())
    seconds = sum(v["seconds"] for v in inf["slides"].values())
    report = {
        "annotation": str(ann_path), "slide_id": slide_id, "scale": scale, "mpp": mpp,
        "frame_level0_original": [float(x0), float(y0), float(x1), float(y1)],
        "standin_size": [width, height], "patch_size": ps, "prepared_counts": {
            k: v["counts"] for k, v in summary["slides"].items()},
        "inference": {"patches": n_patches, "seconds": round(seconds, 1),
                      "patches_per_s": round(n_patches / seconds, 2) if seconds else None,
                      "torch_threads": torch.get_num_threads()},
        "encoder_only": {"patches": int(len(feats)), "seconds": round(enc_seconds, 2),
                         "patches_per_s": round(len(feats) / enc_seconds, 2) if enc_seconds else None},
        "froc": {k: v.get("froc") for k, v in results.items()},
        "froc_detail": {k: v.get("froc_detail") for k, v in results.items()},
        "slide_classes": json.loads((out / "metrics_annotations" / "metrics_per_slide.json").read_text()),
        "timings_s": timings, "total_s": round(time.perf_counter() - t0, 1),
    }
    for row in report["slide_classes"]:
        for key in list(row):
            if key not in ("slide_id", "gt_class", "pred_class", "gt_diameter_um", "n", "n_tumor", "truth"):
                row.pop(key)
    write_json_atomic(out / "standin_report.json", report)
    print(json.dumps({k: report[k] for k in ("standin_size", "prepared_counts", "inference", "encoder_only", "froc")},
                     indent=1))
    return report


@functools.wraps(manifest)
def _cli_manifest(*args, **kwargs) -> None:
    manifest(*args, **kwargs)  # printed; returning the path would make fire print it again


@functools.wraps(standin)
def _cli_standin(*args, **kwargs) -> None:
    standin(*args, **kwargs)


if __name__ == "__main__":
    fire.Fire({"manifest": _cli_manifest, "prepare": prepare, "standin": _cli_standin})
