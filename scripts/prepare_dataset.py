"""Prepare slides for training and inference: tissue mask, labelled patch grid, MONAI datalist.

Example:
    python scripts/prepare_dataset.py --manifest demo_output/data/manifest.json --output_dir demo_output/prepared
    python scripts/prepare_dataset.py --slides /data/camelyon16/images --annotations /data/camelyon16/xml \\
        --mpp 0.243 --target_mpp 0.5 --output_dir prepared
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("prepare_dataset")


def _as_slides(slides) -> str | list[str] | None:
    """Normalise ``--slides`` to a path or a list of paths.

    Fire parses ``"[a,b]"`` into a list only when the items are plain words; with paths (``/``, ``.``) it hands
    over the string itself, which is split here. It may also turn a bare name like ``001`` into a number.
    """
    if slides is None:
        return None
    if isinstance(slides, (list, tuple)):
        return [str(s) for s in slides]
    text = str(slides).strip()
    if text.startswith("[") and text.endswith("]"):
        return [s.strip().strip("'\"") for s in text[1:-1].split(",") if s.strip()]
    return text


def main(
    slides: str | list[str] | None = None,
    output_dir: str = "prepared",
    annotations: str | None = None,
    manifest: str | None = None,
    split: str = "training",
    patch_size: int = 256,
    level: int = 0,
    target_mpp: float | None = None,
    mpp: float | None = None,
    backend: str = "auto",
    tissue_threshold: float = 0.8,
    tumor_threshold: float = 0.2,
    normal_threshold: float = 0.8,
    exhaustive: bool = True,
    thumbnail_max_size: int = 2048,
    overwrite: bool = False,
    log_level: str = "INFO",
) -> None:
    """Detect tissue, lay the patch grid, label it from annotations and write a MONAI datalist.

    For every slide, ``<output_dir>/<slide_id>/`` receives ``patches.csv``, ``tissue_mask.png`` and ``meta.json``;
    ``<output_dir>/datalist.json`` holds ``PatchWSIDataset`` items per split (``location`` is the level-0
    ``[y, x]`` of the patch's top-left corner) and ``summary.json`` what was done. Slides already prepared with the
    same settings and inputs are skipped unless ``--overwrite``. A slide that cannot be read is reported and the
    others go on; the exit status is then 1.

    Args:
        slides: a folder of slides, one slide file, or a list (``--slides "[a.svs,b.svs]"``).
        output_dir: where the outputs go.
        annotations: folder with annotations named after the slides (``<stem>.xml``/``.geojson``/``.json`` or a
            label mask ``<stem>_mask.tif``/``.png``, 1 or 255 = tumor; a pyramidal mask TIFF is read at the
            coarsest level with 16 mask pixels per cell side); defaults to the slides' own folder.
        manifest: a dataset ``manifest.json`` (from the synthetic generator) instead of ``slides``; its splits
            are used.
        split: split name for ``slides`` (``training``, ``validation``, ``test``; ``train``/``val`` accepted).
        patch_size: patch side in pixels at the read level.
        level: pyramid level patches are read at (ignored with ``target_mpp``).
        target_mpp: read at the level whose µm/px is within 10 % of this instead.
        mpp: level-0 µm/px to use instead of the file's, for every slide (needed when a file has none;
            Camelyon16: 0.243).
        backend: slide reader: ``auto`` (cuCIM, then OpenSlide, then tiffslide), ``cucim``, ``openslide`` or
            ``tiffslide``.
        tissue_threshold: minimum tissue fraction of a kept patch.
        tumor_threshold: minimum annotated tumor fraction of a tumor patch.
        normal_threshold: minimum normal fraction of a normal patch.
        exhaustive: the annotations mark all tumor, so unannotated tissue is normal (``--noexhaustive`` for
            partially annotated slides).
        thumbnail_max_size: longest side of the image tissue detection runs on.
        overwrite: redo slides that are already prepared.
        log_level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    """
    logging.basicConfig(level=str(log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    slides = _as_slides(slides)
    if slides is None and manifest is None:
        print("error: give --slides (a folder, a file or a list of files) or --manifest", file=sys.stderr)
        sys.exit(2)
    # imported here so that --help and argument errors answer without loading torch and MONAI
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset

    cfg = PrepareConfig(
        patch_size=int(patch_size), level=int(level), target_mpp=None if target_mpp is None else float(target_mpp),
        mpp=None if mpp is None else float(mpp), backend=str(backend), tissue_threshold=float(tissue_threshold),
        tumor_threshold=float(tumor_threshold), normal_threshold=float(normal_threshold), exhaustive=bool(exhaustive),
        thumbnail_max_size=int(thumbnail_max_size),
    )
    try:
        inputs = collect_inputs(slides=slides, annotations=annotations, manifest=manifest, split=str(split))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not inputs:
        print(f"error: no slides found in {slides!r}", file=sys.stderr)
        sys.exit(1)
    summary = prepare_dataset(inputs, output_dir, cfg, overwrite=bool(overwrite))

    per_split: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for info in summary["slides"].values():
        for key, n in info["counts"].items():
            per_split[info["split"]][key] += n
    done, skipped, failed = summary["done"], summary["skipped"], summary["failed"]
    print(f"{len(inputs)} slide(s) -> {Path(output_dir)}: {len(done)} done, {len(skipped)} skipped "
          f"(already prepared), {len(failed)} failed")
    for slide_id, reason in failed.items():
        print(f"  FAILED {slide_id}: {reason}")
    for split_name, c in sorted(per_split.items()):
        print(f"  {split_name}: {c['cells']} patches ({c['tumor']} tumor, {c['normal']} normal, "
              f"{c['nolabel']} without label)")
    print(f"datalist: {summary['datalist']}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
