"""Prepare slides for training and inference: tissue mask, labelled patch grid, MONAI datalist.

The settings are the bundle's (``bundle/configs/common.json#prepare``, the same that inference on new slides
uses), with an overlay's when ``--config`` names one and the flags below on top. The same run as a bundle
workflow: ``python -m monai.bundle run --config_file "['bundle/configs/common.json','bundle/configs/prepare.json']"
--manifest demo_output/data/manifest.json --output_dir demo_output/prepared``.

Example:
    python scripts/prepare_dataset.py --manifest demo_output/data/manifest.json --output_dir demo_output/prepared
    python scripts/prepare_dataset.py --slides /data/camelyon16/images --annotations /data/camelyon16/xml \\
        --mpp 0.243 --target_mpp 0.5 --output_dir prepared
    python scripts/prepare_dataset.py --manifest camelyon16/manifest.json --config configs/datasets/camelyon16.json
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"

#: the flags that override a ``prepare`` setting (None: keep the config's value)
SETTINGS = ("patch_size", "level", "target_mpp", "mpp", "backend", "tissue_threshold", "tumor_threshold",
            "normal_threshold", "exhaustive", "thumbnail_max_size", "exclude_ink", "annotation_max_outside_fraction",
            "clip_annotations", "slide_timeout_s")


def _as_list(value) -> str | list[str] | None:
    """Normalise a path-or-list flag (``--slides``, ``--negative``) to a path or a list of strings.

    Fire parses ``"[a,b]"`` into a list only when the items are plain words; with paths (``/``, ``.``) it hands
    over the string itself, which is split here. It may also turn a bare name like ``001`` into a number.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [str(s) for s in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        return [s.strip().strip("'\"") for s in text[1:-1].split(",") if s.strip()]
    return text


def main(
    slides: str | list[str] | None = None,
    output_dir: str = "prepared",
    annotations: str | None = None,
    manifest: str | None = None,
    split: str = "training",
    negative: bool | str | list[str] = False,
    config: str | None = None,
    patch_size: int | None = None,
    level: int | None = None,
    target_mpp: float | None = None,
    mpp: float | None = None,
    backend: str | None = None,
    tissue_threshold: float | None = None,
    tumor_threshold: float | None = None,
    normal_threshold: float | None = None,
    exhaustive: bool | None = None,
    thumbnail_max_size: int | None = None,
    exclude_ink: bool | None = None,
    annotation_max_outside_fraction: float | None = None,
    clip_annotations: bool | None = None,
    slide_timeout_s: float | None = None,
    overwrite: bool = False,
    log_level: str = "INFO",
) -> None:
    """Detect tissue, lay the patch grid, label it from annotations and write a MONAI datalist.

    For every slide, ``<output_dir>/<slide_id>/`` receives ``patches.csv``, ``tissue_mask.png`` and ``meta.json``
    (written last, with the other files' SHA-256: the slide's "done" marker); ``<output_dir>/datalist.json`` holds
    ``PatchWSIDataset`` items per split (``location`` is the level-0 ``[y, x]`` of the patch's top-left corner)
    and ``summary.json`` what was done and every warning. Slides already prepared with the same settings and
    inputs are skipped unless ``--overwrite``; runs into the same ``output_dir`` add their slides to it (one run
    per split works). A slide that cannot be read is reported and the others go on; the exit status is then 1
    (2 for bad settings or inputs).

    Args:
        slides: a folder of slides, one slide file, or a list (``--slides "[a.svs,b.svs]"``).
        output_dir: where the outputs go.
        annotations: folder with annotations named after the slides (``<stem>.xml``/``.geojson``/``.json`` or a
            label mask ``<stem>_mask.tif``/``.png``, 1 or 255 = tumor); defaults to the slides' own folder.
            Files there that match no slide are listed in the summary's warnings.
        manifest: a dataset ``manifest.json`` instead of ``slides``; its splits (and ``"negative": true``) are used.
        split: split name for ``slides`` (``training``, ``validation``, ``test``; ``train``/``val`` accepted).
        negative: declare slides tumor-free (all tissue normal without an annotation): ``--negative`` for all, or
            slide ids (``--negative "[n1,n2]"``).
        config: an overlay with its own ``prepare`` section (e.g. ``configs/datasets/camelyon16.json``).
        patch_size: patch side in pixels at the read level.
        level: pyramid level patches are read at (ignored with ``target_mpp``).
        target_mpp: read at the level whose µm/px is within 10 % of this instead.
        mpp: level-0 µm/px to use instead of the file's, for every slide (Camelyon16: 0.243).
        backend: slide reader: ``auto``, ``cucim``, ``openslide`` or ``tiffslide``.
        tissue_threshold: minimum tissue fraction of a kept patch.
        tumor_threshold: minimum annotated tumor fraction of a tumor patch.
        normal_threshold: minimum normal fraction of a normal patch.
        exhaustive: the annotations mark all tumor, so unannotated tissue is normal (``--noexhaustive`` for
            partially annotated slides).
        thumbnail_max_size: longest side of the image tissue detection runs on.
        exclude_ink: leave pen marks out of the tissue (``--noexclude_ink`` to keep them).
        annotation_max_outside_fraction: fail a slide when more than this fraction of its annotated area lies
            outside it (default 1.0: all of it).
        clip_annotations: clip such annotations to the slide instead.
        slide_timeout_s: time limit per slide (seconds); a slide over it fails and the batch goes on.
        overwrite: redo slides that are already prepared (and allow moving a slide to another split).
        log_level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    """
    slides = _as_list(slides)
    if slides is None and manifest is None:
        print("error: give --slides (a folder, a file or a list of files) or --manifest", file=sys.stderr)
        sys.exit(2)
    # imported here so that --help and argument errors answer without loading torch and MONAI
    from monai_wsi_ext.errors import ConfigError
    from monai_wsi_ext.prep.prepare import run_prepare, settings_from_bundle
    from monai_wsi_ext.utils import setup_logging

    setup_logging(log_level)
    given = dict(patch_size=patch_size, level=level, target_mpp=target_mpp, mpp=mpp, backend=backend,
                 tissue_threshold=tissue_threshold, tumor_threshold=tumor_threshold,
                 normal_threshold=normal_threshold, exhaustive=exhaustive, thumbnail_max_size=thumbnail_max_size,
                 exclude_ink=exclude_ink, annotation_max_outside_fraction=annotation_max_outside_fraction,
                 clip_annotations=clip_annotations, slide_timeout_s=slide_timeout_s)
    files = [CONFIGS / "common.json"] + ([Path(config)] if config else [])
    try:
        if config and not Path(config).is_file():
            raise ConfigError(f"--config {config}: file not found")
        cfg = settings_from_bundle(files, **{f"prepare#{k}": v for k, v in given.items() if v is not None})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_prepare(output_dir, cfg, slides=slides, annotations=annotations, manifest=manifest, split=str(split),
                negative=_as_list(negative), overwrite=bool(overwrite))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
