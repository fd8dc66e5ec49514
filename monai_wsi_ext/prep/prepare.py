"""Slide -> tissue mask -> labelled patch grid, for one slide or a batch, with atomic outputs.

Per slide ``<output_dir>/<slide_id>/`` holds ``patches.csv`` (the patch table), ``tissue_mask.png`` (with its
downsample in a PNG text chunk) and ``meta.json`` (slide geometry, grid shape, counts, the settings used). The
batch writes ``datalist.json`` (MONAI ``PatchWSIDataset`` items, grouped by split) and ``summary.json``
(which slides failed and why, every per-slide warning).

``meta.json`` is the slide's "done" marker: a rewrite removes it first, it is written last, and it records the
SHA-256 of the other two files and the settings. A slide is taken as prepared only when its ``meta.json`` matches
the settings and inputs of the run and both files still hash as recorded, so a kill between any two writes (even
over an output of other settings) means "redo", never a stale mix. Runs into the same output folder add to it:
the datalist holds every prepared slide of the folder, by split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.prep.grid import PatchGrid, PatchLabel, label_cells, make_grid, read_patch_table, write_patch_table
from monai_wsi_ext.io.atomic import remove_stale_temporaries, write_json_atomic
from monai_wsi_ext.prep.tissue import TissueMask, detect_tissue, save_mask_png
from monai_wsi_ext.io.dicom import is_dicom_file
from monai_wsi_ext.io.wsi import Slide, open_slide
from monai_wsi_ext.utils import file_sha256, split_set

__all__ = ["PrepareConfig", "SlideInput", "PreparedSlide", "reader_mpp", "prepare_in_memory", "write_prepared",
           "load_prepared", "load_prepared_slides", "prepare_slide", "prepare_dataset", "collect_inputs",
           "datalist_items",
           "prepared_is_valid", "unmatched_annotations", "label_warnings", "settings_from_bundle",
           "settings_from_parser", "prepare_config", "run_prepare",
           "format_summary"]

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".btf")
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


@dataclass
class PrepareConfig:
    """Settings of the patch-grid step (defaults follow the paper).

    Attributes:
        patch_size: patch side in pixels at the read level.
        level: read level; ignored when ``target_mpp`` is set.
        target_mpp: read at the level closest to this mpp (within ``mpp_rtol``).
        mpp_rtol: relative tolerance for ``target_mpp``.
        mpp: level-0 mpp to use instead of the file's (required for files without one, e.g. some Camelyon16
            TIFFs: 0.243); it overrides the file's value for every slide.
        backend: slide reader backend (``auto``, ``cucim``, ``openslide``, ``tiffslide``).
        tissue_threshold: minimum tissue fraction of a kept cell.
        tissue_channel: Otsu channel (``saturation``, ``gray``, ``od``).
        thumbnail_max_size: longest side of the image tissue detection runs on.
        tissue_level: run tissue detection on this level instead.
        min_object_um2: smallest tissue component kept.
        min_hole_um2: largest hole filled.
        tumor_threshold: minimum tumor fraction of a tumor cell.
        normal_threshold: minimum normal fraction of a normal cell.
        exhaustive: annotations mark all tumor, so unannotated tissue is normal.
        label_cells_px: label-mask pixels per cell side used for rasterising annotations.
        class_map: class name -> ``tumor``/``normal``/``exclude`` for GeoJSON/ImageScope classes.
        label_mask_tumor_values: values of a label-mask TIFF/PNG that mean tumor (binary tumor masks such as
            Camelyon16's use 1 or 255).
        label_mask_normal_values: values that mean normal (none by default: with ``exhaustive`` the unannotated
            tissue is normal).
        exclude_ink: leave pen marks (very dark or saturated blue/green/black) out of the tissue.
        annotation_max_outside_fraction: a slide whose annotated area lies outside it by more than this fraction
            fails (default 1.0: only when all of it is outside, e.g. annotations in another level's coordinates).
        clip_annotations: clip such annotations to the slide instead of failing.
        slide_timeout_s: time limit per slide in seconds (None: no limit); a slide over it fails, the batch goes
            on. Not part of the settings fingerprint (it does not change the outputs).
    """

    patch_size: int = 256
    level: int = 0
    target_mpp: float | None = None
    mpp_rtol: float = 0.1
    mpp: float | None = None
    backend: str = "auto"
    tissue_threshold: float = 0.8
    tissue_channel: str = "saturation"
    thumbnail_max_size: int = 2048
    tissue_level: int | None = None
    min_object_um2: float = 20000.0
    min_hole_um2: float = 20000.0
    tumor_threshold: float = 0.2
    normal_threshold: float = 0.8
    exhaustive: bool = True
    label_cells_px: int = 16
    class_map: dict | None = None
    label_mask_tumor_values: tuple = (1, 255)
    label_mask_normal_values: tuple = ()
    exclude_ink: bool = True
    annotation_max_outside_fraction: float = 1.0
    clip_annotations: bool = False
    slide_timeout_s: float | None = None

    def fingerprint(self) -> str:
        """Hash of the settings that change the outputs (everything but ``slide_timeout_s``)."""
        settings = {k: v for k, v in asdict(self).items() if k not in _NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


_NOT_FINGERPRINTED = ("slide_timeout_s",)


@dataclass
class SlideInput:
    """One slide to prepare: its file, its annotation (optional), its id and its split."""

    image: str
    annotation: str | None = None
    slide_id: str | None = None
    split: str = "training"
    tissue_mask: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.slide_id is None:
            self.slide_id = Path(self.image).stem
        self.slide_id = str(self.slide_id)


def _label_mask_for(inp: SlideInput, cfg: PrepareConfig, slide_size: tuple[int, int], cell: float,
                    warnings: list[str] | None = None):
    """Rasterise the slide's annotation to a label mask (0 none, 1 normal, 2 tumor) and its downsample.

    Problems that do not stop the slide (ignored classes, no polygons, skipped items, parts outside the slide) are
    logged and appended to ``warnings`` as text for the summary.

    Raises:
        AnnotationError: the annotation cannot be read, or too much of it lies outside the slide (see
            :func:`~monai_wsi_ext.io.annotations.check_annotation_extent`; ``cfg.annotation_max_outside_fraction``,
            default all, and ``cfg.clip_annotations``), or a label mask's aspect ratio is not the slide's.
    """
    import warnings as pywarnings

    from monai_wsi_ext.io import annotations as ann

    notes: list[str] = []
    width, height = slide_size
    downsample = max(cell / cfg.label_cells_px, 1.0)
    shape = (int(np.ceil(height / downsample)), int(np.ceil(width / downsample)))
    path = Path(inp.annotation)
    if path.suffix.lower() in (".png", ".tif", ".tiff"):
        # the coarsest pyramid level that still has label_cells_px mask pixels per cell (Camelyon16 masks are
        # pyramids of the slide's size: level 0 would not fit in memory)
        raw = ann.read_label_mask(path, level=ann.label_mask_level_for(path, width, downsample),
                                  tumor_values=tuple(cfg.label_mask_tumor_values),
                                  normal_values=tuple(cfg.label_mask_normal_values))
        mask_aspect, slide_aspect = raw.shape[1] / raw.shape[0], width / height
        if abs(mask_aspect / slide_aspect - 1) > 0.05:
            raise ann.AnnotationError(path, f"label mask of {raw.shape[1]} x {raw.shape[0]} px does not have the "
                                            f"aspect ratio of the {width} x {height} px slide: another slide's mask?")
        if not (raw == ann.MASK_TUMOR).any() and not (raw == ann.MASK_NORMAL).any():
            notes.append(f"{path}: label mask has no tumor value {tuple(cfg.label_mask_tumor_values)}: the slide is "
                         "treated as having no tumor")
        _keep_warnings(notes, warnings)
        return raw, width / raw.shape[1]
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always", ann.AnnotationWarning)
        polygons = ann.read_annotations(path, class_map=cfg.class_map)
    notes += [str(w.message) for w in caught if issubclass(w.category, ann.AnnotationWarning)]
    notes += ann.annotation_warnings(polygons, path)
    polygons, extent_notes = ann.check_annotation_extent(
        polygons, (width, height), max_outside_fraction=float(cfg.annotation_max_outside_fraction),
        clip=bool(cfg.clip_annotations), path_for_errors=path)
    notes += extent_notes
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always", ann.AnnotationWarning)
        mask = ann.rasterize_annotations(polygons, shape, downsample, path_for_errors=path)
    if not extent_notes:  # the extent note already says what lies outside
        notes += [str(w.message) for w in caught if issubclass(w.category, ann.AnnotationWarning)]
    _keep_warnings(notes, warnings)
    return mask, downsample


@dataclass
class PreparedSlide:
    """One slide after tissue detection and the labelled patch grid: what every later stage reads.

    Built in memory by :func:`prepare_in_memory` (inference on new slides: nothing is written and read back) or
    read from a prepared folder by :func:`load_prepared`. ``meta`` holds everything ``meta.json`` holds.

    Attributes:
        slide_id: identifier used in tables and outputs.
        image: slide path.
        grid: the labelled patch grid.
        meta: the ``meta.json`` content (geometry, settings, counts).
        dir: the prepared folder of the slide (None when prepared in memory).
        slide: the open slide when prepared in this process (reused for patch reading and the thumbnail).
        tissue: the tissue mask when prepared in this process.
    """

    slide_id: str
    image: str
    grid: PatchGrid
    meta: dict
    dir: str | None = None
    slide: Slide | None = field(default=None, repr=False)
    tissue: TissueMask | None = field(default=None, repr=False)

    @property
    def split(self) -> str:
        return self.meta.get("split", "")

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.meta["dimensions"])

    @property
    def mpp(self) -> float | None:
        return self.meta.get("mpp")

    @property
    def reader_mpp(self) -> float | None:
        """The mpp to give the reader when reopening the slide: the user's override, else None (the file's own)."""
        return reader_mpp(self.meta)

    def open(self, backend: str = "auto") -> Slide:
        """The open slide (opened once, then reused)."""
        if self.slide is None:
            self.slide = open_slide(self.image, backend=backend, mpp=self.reader_mpp)
        return self.slide

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()
            self.slide = None


def reader_mpp(meta: dict) -> float | None:
    """The one mpp rule: a slide prepared with a user-given mpp (``mpp_source == "user"``) is reopened with it;
    otherwise the reader takes the file's own value."""
    return meta.get("mpp") if meta.get("mpp_source") == "user" else None


def prepare_in_memory(inp: SlideInput, cfg: PrepareConfig | None = None, slide: Slide | None = None) -> PreparedSlide:
    """Tissue detection, the patch grid and labels for one slide, in memory; the slide stays open in the result.

    Raises:
        MonaiWsiExtError: the slide or its annotation cannot be read (``WSIReadError``/``AnnotationError``).
    """
    cfg = cfg or PrepareConfig()
    notes = label_warnings(inp, cfg)
    for note in notes:
        logger.warning("%s", note)
    slide = slide or open_slide(inp.image, backend=cfg.backend, mpp=inp.extra.get("mpp", cfg.mpp))
    try:
        level = slide.level_for_mpp(cfg.target_mpp, cfg.mpp_rtol) if cfg.target_mpp else int(cfg.level)
        if not 0 <= level < slide.level_count:
            raise MonaiWsiExtError(f"{inp.image}: level {level} requested but the slide has {slide.level_count}")
        tissue = detect_tissue(slide, level=cfg.tissue_level, max_size=cfg.thumbnail_max_size,
                               channel=cfg.tissue_channel, min_object_um2=cfg.min_object_um2,
                               min_hole_um2=cfg.min_hole_um2, external_mask=inp.tissue_mask,
                               exclude_ink=cfg.exclude_ink)
        grid = make_grid(inp.slide_id, slide.dimensions, tissue.mask, tissue.downsample, cfg.patch_size, level,
                         slide.level_downsamples[level], cfg.tissue_threshold)
        if inp.annotation:
            label_mask, label_ds = _label_mask_for(inp, cfg, slide.dimensions, grid.cell_size, warnings=notes)
            label_cells(grid, label_mask, label_ds, tissue.mask, tissue.downsample, exhaustive=cfg.exhaustive,
                        tumor_threshold=cfg.tumor_threshold, normal_threshold=cfg.normal_threshold)
        elif cfg.exhaustive and inp.extra.get("negative", False):
            # a slide known to be tumor-free (e.g. Camelyon16 Normal_*) without an annotation file
            grid.normal = grid.tissue.copy()
            grid.labels = np.where(grid.normal >= cfg.normal_threshold, PatchLabel.NORMAL, PatchLabel.NOLABEL)
    except BaseException:
        slide.close()
        raise
    meta = {
        "slide_id": inp.slide_id, "image": str(Path(inp.image).resolve()),
        "annotation": str(Path(inp.annotation).resolve()) if inp.annotation else None, "split": inp.split,
        "backend": slide.backend, "dimensions": list(slide.dimensions), "mpp": slide.mpp,
        "mpp_source": slide.mpp_source, "level_count": slide.level_count, "level": level,
        "level_downsample": slide.level_downsamples[level], "patch_size": cfg.patch_size,
        "cell_size": grid.cell_size, "grid_shape": list(grid.shape), "tissue_mask": "tissue_mask.png",
        "tissue_mask_downsample": tissue.downsample, "tissue_fraction": tissue.fraction,
        "tissue_threshold_value": tissue.threshold, "counts": grid.counts(), "config": asdict(cfg),
        "config_fingerprint": cfg.fingerprint(), "input_signature": _signature(inp),
    }
    meta.update(slide_meta_extras(slide, tissue, grid, notes))
    if getattr(slide, "dicom", None) is not None:
        meta["dicom"] = slide.dicom.summary()
    if len(grid) == 0:
        logger.warning("%s: no patch-grid cell has >= %.0f%% tissue (tissue is %.2f%% of the thumbnail); the slide "
                       "contributes no patches", inp.image, 100 * cfg.tissue_threshold, 100 * tissue.fraction)
    return PreparedSlide(inp.slide_id, meta["image"], grid, meta, slide=slide, tissue=tissue)


#: the files of a prepared slide that its ``meta.json`` covers by hash
PREPARED_FILES = ("tissue_mask.png", "patches.csv")


def write_prepared(prepared: PreparedSlide, output_dir: str | os.PathLike) -> dict:
    """Write a slide's prepared folder and return the meta.

    The old ``meta.json`` (the "done" marker) is removed first, then the tissue mask and the patch table are
    written (each atomically), then ``meta.json`` with their SHA-256 (``files``): a kill at any point leaves a
    folder that :func:`prepared_is_valid` refuses.
    """
    out = Path(output_dir) / prepared.slide_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    remove_stale_temporaries(out)
    save_mask_png(out / "tissue_mask.png", prepared.tissue)
    write_patch_table(out / "patches.csv", prepared.grid)
    prepared.meta["files"] = {name: file_sha256(out / name) for name in PREPARED_FILES}
    write_json_atomic(out / "meta.json", prepared.meta)
    prepared.dir = str(out)
    return prepared.meta


def prepared_is_valid(slide_dir: str | os.PathLike, meta: dict) -> str | None:
    """Why the prepared folder ``slide_dir`` does not match its ``meta.json`` (``meta``), or None when it does: a
    file it covers is missing or its SHA-256 differs (a run was killed between writes, or a file was edited)."""
    slide_dir = Path(slide_dir)
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        return f"{slide_dir / 'meta.json'} records no file hashes (written by an older version)"
    for name in PREPARED_FILES:
        path = slide_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if recorded.get(name) != file_sha256(path):
            return f"{path} does not match the SHA-256 in {slide_dir / 'meta.json'}"
    return None


def prepare_slide(inp: SlideInput, output_dir: str | os.PathLike, cfg: PrepareConfig | None = None) -> dict:
    """Run tissue detection, the patch grid and labelling for one slide and write its outputs.

    Returns:
        the slide's ``meta.json`` content.

    Raises:
        MonaiWsiExtError: the slide or its annotation cannot be read (``WSIReadError``/``AnnotationError``).
    """
    prepared = prepare_in_memory(inp, cfg)
    try:
        return write_prepared(prepared, output_dir)
    finally:
        prepared.close()


def _read_meta(slide_dir: Path) -> dict | None:
    try:
        meta = json.loads((slide_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def load_prepared(slide_dir: str | os.PathLike) -> PreparedSlide:
    """A prepared slide read back from its folder (``meta.json`` and ``patches.csv``).

    Raises:
        MonaiWsiExtError: the folder is incomplete or its files do not match its ``meta.json`` (rerun
            ``prepare_dataset.py`` on it).
    """
    slide_dir = Path(slide_dir)
    meta = _read_meta(slide_dir)
    if meta is None:
        raise MonaiWsiExtError(f"{slide_dir}: no readable meta.json: the slide is not (completely) prepared; rerun "
                               "scripts/prepare_dataset.py")
    problem = prepared_is_valid(slide_dir, meta)
    if problem:
        raise MonaiWsiExtError(f"{slide_dir}: incomplete or stale prepared slide ({problem}); rerun "
                               "scripts/prepare_dataset.py")
    grid = read_patch_table(slide_dir / "patches.csv", shape=tuple(meta["grid_shape"]), cell_size=meta["cell_size"])
    return PreparedSlide(meta["slide_id"], meta["image"], grid, meta, dir=str(slide_dir))


def load_prepared_slides(prepared_dir: str | os.PathLike, split: str | Sequence[str] | None = None
                         ) -> list[PreparedSlide]:
    """The prepared slides of a ``prepare_dataset`` output folder, sorted by slide id (``split`` filters)."""
    splits = split_set(split)
    out = []
    for meta_path in sorted(Path(prepared_dir).glob("*/meta.json")):
        prepared = load_prepared(meta_path.parent)
        if splits is None or prepared.split in splits:
            out.append(prepared)
    return out


def _signature(inp: SlideInput) -> dict:
    sig = {}
    for key in ("image", "annotation", "tissue_mask"):
        p = getattr(inp, key)
        if p:
            path = Path(p)
            if key == "image" and (path.is_dir() or is_dicom_file(path)):
                # a DICOM slide: the DICOM files of its folder, so a level rewritten or added counts as a change
                from monai_wsi_ext.io.dicom import dicom_files

                stats = [f.stat() for f in dicom_files(path if path.is_dir() else path.parent)] or [path.stat()]
                sig[key] = [str(path.resolve()), sum(st.st_size for st in stats), int(max(st.st_mtime for st in stats))]
                continue
            st = path.stat()
            sig[key] = [str(path.resolve()), st.st_size, int(st.st_mtime)]
    return sig


def _is_done(inp: SlideInput, output_dir: Path, cfg: PrepareConfig) -> dict | None:
    """The slide's meta when its folder is complete and was made from the same inputs, settings and split."""
    slide_dir = output_dir / inp.slide_id
    meta = _read_meta(slide_dir)
    if meta is None or meta.get("config_fingerprint") != cfg.fingerprint() or \
            meta.get("input_signature") != _signature(inp) or meta.get("split") != inp.split:
        return None
    problem = prepared_is_valid(slide_dir, meta)
    if problem:
        logger.warning("%s: redone (%s)", inp.image, problem)
        return None
    return meta


def datalist_items(meta: dict, output_dir: str | os.PathLike, include_nolabel: bool = False) -> list[dict]:
    """MONAI ``PatchWSIDataset`` items for one prepared slide.

    Each item has ``image`` (slide path), ``location`` (level-0 ``[y, x]``, MONAI's order), ``size``
    (``[h, w]`` at ``level``), ``level``, ``label`` (1 tumor / 0 normal; nolabel omitted unless asked) and the
    grid position ``row``/``col`` and ``slide_id``.

    ``location`` is the patch's top-left corner: with MONAI's ``PatchWSIDataset`` pass ``center_location=False``
    (its default treats locations as centres and would shift every patch by half its size). For a DICOM slide
    ``image`` is its level-0 instance file, read by MONAI's ``reader="OpenSlide"`` (cuCIM does not read DICOM).
    """
    import csv

    items = []
    # a DICOM slide's items name its level-0 instance file, which MONAI's OpenSlide reader opens (not the folder)
    image = (meta.get("dicom") or {}).get("level0_file") or meta["image"]
    with open(Path(output_dir) / meta["slide_id"] / "patches.csv", newline="") as f:
        for d in csv.DictReader(f):
            label = int(d["label"])
            if label == PatchLabel.NOLABEL and not include_nolabel:
                continue
            items.append({"image": image, "location": [int(d["y"]), int(d["x"])],
                          "size": [int(d["patch_size"])] * 2, "level": int(d["level"]), "label": label,
                          "row": int(d["row"]), "col": int(d["col"]), "slide_id": meta["slide_id"]})
    return items


def collect_inputs(slides: str | os.PathLike | list | None = None, annotations: str | os.PathLike | None = None,
                   manifest: str | os.PathLike | None = None, split: str = "training",
                   negative: bool | Sequence[str] = False) -> list[SlideInput]:
    """Build the list of slides to prepare.

    Args:
        slides: a folder of slides, one slide file, or a list of slide files. DICOM WSI series count as slides: a
            folder of DICOM instances (in the folder itself or as its sub-folders; one slide per WSI series, named
            after its folder), or one instance file of a series.
        annotations: a folder holding annotations named after the slides (``<stem>.xml``, ``.geojson``,
            ``.json``, or a label mask ``<stem>_mask.tif``/``.png``); defaults to the slides' folder. Annotation
            files there that match no slide are logged (see :func:`unmatched_annotations` for the summary).
        manifest: a dataset manifest JSON (as written by ``make_demo_slides``) instead of ``slides``. A record's
            ``"negative": true`` declares the slide tumor-free (all its tissue normal without an annotation file).
        split: split name for slides not from a manifest.
        negative: declare slides tumor-free: True for every slide, or the slide ids (file stems) of those that are.

    Raises:
        ConfigError: ``slides`` is a folder with no slide files (or an empty list), or ``negative`` names a slide
            that is not there.
    """
    if manifest is not None:
        manifest = Path(manifest)
        data = json.loads(manifest.read_text())
        root = manifest.parent
        inputs = []
        for rec in data["slides"]:
            ann = rec.get("asap_xml") or rec.get("geojson") or rec.get("annotation")
            inputs.append(SlideInput(image=str(root / rec["image"]), annotation=str(root / ann) if ann else None,
                                     slide_id=str(rec["id"]), split=_split_name(rec.get("split", split)),
                                     extra={"negative": True} if _declared_negative(rec.get("negative")) else {}))
        return _mark_negative(inputs, negative)
    if slides is None:
        raise ValueError("give `slides` (a folder, a file or a list of files) or `manifest`.")
    # (slide path, slide id): files by their stem; DICOM WSI series (folders of instances) by their folder's name
    if isinstance(slides, (list, tuple)):
        entries = [e for s in slides for e in _slide_entries(Path(s))]
    elif Path(slides).is_dir():
        folder = Path(slides)
        entries = [(p, p.stem) for p in sorted(folder.iterdir()) if p.suffix.lower() in SLIDE_SUFFIXES
                   and not p.stem.endswith("_mask") and not (p.is_dir() or is_dicom_file(p))]
        entries += _dicom_entries(folder, subfolders=True)
    else:
        entries = _slide_entries(Path(slides))
    if not entries:
        where = f"folder {str(slides)!r}" if not isinstance(slides, (list, tuple)) else "the empty list given"
        raise ConfigError(f"no slides found in {where} (slide suffixes: {', '.join(SLIDE_SUFFIXES)}; or DICOM WSI "
                          "series: folders of DICOM instances).")
    ann_dir = Path(annotations) if annotations is not None else None
    inputs = []
    for f, stem in entries:
        folder = ann_dir or f.parent
        # lexists: a broken or looping annotation link is taken, so that reading it fails loudly instead of the
        # slide silently having no annotation
        ann = next((folder / f"{stem}{s}" for s in ANNOTATION_SUFFIXES if os.path.lexists(folder / f"{stem}{s}")),
                   None)
        if ann is None:
            masks = (folder / f"{stem}_mask{s}" for s in (".tif", ".png"))
            ann = next((m for m in masks if os.path.lexists(m)), None)
        inputs.append(SlideInput(image=str(f), annotation=str(ann) if ann else None, slide_id=stem,
                                 split=_split_name(split)))
    if ann_dir is not None:
        for note in unmatched_annotations(inputs, ann_dir):
            logger.warning("%s", note)
    return _mark_negative(inputs, negative)


def _dicom_entries(folder: Path, subfolders: bool = False) -> list[tuple[Path, str]]:
    """``(slide path, slide id)`` of the DICOM WSI series in ``folder`` (its own DICOM files) and, with
    ``subfolders``, in each sub-folder that holds DICOM files. A folder with one WSI series is one slide named after
    the folder; a folder with several gives one slide per series, its path the series' level-0 instance file
    (:func:`monai_wsi_ext.io.dicom.series_slide_ids`). Without pydicom each such folder is taken as one slide, which
    then fails naming the ``dicom`` extra."""
    from monai_wsi_ext.io import dicom

    folders = [folder] if dicom.dicom_files(folder) else []
    if subfolders:
        folders += [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")
                    and dicom.dicom_files(p)]
    out = []
    for d in folders:
        try:
            series = dicom.find_wsi_series(d)
        except ConfigError:
            out.append((d, d.name))
            continue
        if not series:
            logger.warning("%s: DICOM files but no VL Whole Slide Microscopy VOLUME image; not taken as a slide", d)
            continue
        ids = dicom.series_slide_ids(d.name, series)
        out += [(d, ids[0])] if len(series) == 1 else [(s.level0.path, i) for s, i in zip(series, ids)]
    return out


def _slide_entries(path: Path) -> list[tuple[Path, str]]:
    """``(slide path, slide id)`` of one given slide: a file, a DICOM instance file (named as its series' folder
    names it) or a DICOM WSI folder."""
    if path.is_dir():
        return _dicom_entries(path) or [(path, path.name)]  # a folder without DICOM fails when opened, naming it
    if is_dicom_file(path):
        from monai_wsi_ext.io import dicom

        try:
            own = dicom.find_wsi_series(path)
            series = dicom.find_wsi_series(path.parent)
        except ConfigError:
            return [(path, path.parent.name)]
        if own:
            ids = dict(zip((s.series_uid for s in series), dicom.series_slide_ids(path.parent.name, series)))
            return [(path, ids.get(own[0].series_uid, path.parent.name))]
        return [(path, path.stem)]
    return [(path, path.stem)]


def _split_name(split: str) -> str:
    aliases = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
               "validation": "validation", "test": "test"}
    return aliases.get(split.strip().lower(), split) if isinstance(split, str) else split


def prepare_dataset(inputs: list[SlideInput], output_dir: str | os.PathLike, cfg: PrepareConfig | None = None,
                    overwrite: bool = False, progress: bool = True, dataset_warnings: Sequence[str] = ()) -> dict:
    """Prepare every slide; a slide that fails is reported and skipped, the others finish.

    Runs into the same ``output_dir`` add to it (e.g. ``--split training`` then ``--split validation``): the
    datalist holds every complete prepared slide of the folder by split, this run's and earlier runs'.

    Args:
        inputs: the slides (see :func:`collect_inputs`).
        output_dir: the prepared folder.
        cfg: the settings.
        overwrite: redo slides already prepared (and allow moving a slide to another split).
        progress: show a progress bar.
        dataset_warnings: warnings about the inputs as a whole (e.g. :func:`unmatched_annotations`) for the summary.

    Returns:
        the summary (also written to ``summary.json``): ``done``, ``skipped`` (already prepared), ``failed``
        (slide id -> reason), ``kept`` (slides of earlier runs in the folder), the datalist path, ``slides``
        (split, counts and status of every slide in the datalist) and ``warnings`` (per slide, and ``dataset``).

    Raises:
        ConfigError: bad settings (:func:`validate_prepare_config`), repeated slide ids, or a slide already prepared
            in this folder under another split (without ``overwrite``).
    """
    cfg = cfg or PrepareConfig()
    validate_prepare_config(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    ids = [i.slide_id for i in inputs]
    dupes = {s for s in ids if ids.count(s) > 1}
    if dupes:
        raise ConfigError(f"slide ids must be unique, these repeat: {sorted(dupes)}")
    earlier = _earlier_slides(output_dir, exclude=set(ids))
    if not overwrite:
        _check_split_moves(inputs, output_dir)
    try:
        from tqdm import tqdm

        iterator = tqdm(inputs, desc="prepare", unit="slide", disable=not progress or len(inputs) < 2)
    except ImportError:  # pragma: no cover
        iterator = inputs
    done, skipped, failed, metas = [], [], {}, {}
    for inp in iterator:
        meta = None if overwrite else _is_done(inp, output_dir, cfg)
        if meta is not None:
            skipped.append(inp.slide_id)
            metas[inp.slide_id] = meta
            continue
        try:
            with slide_timeout_for(cfg, inp):
                metas[inp.slide_id] = prepare_slide(inp, output_dir, cfg)
            done.append(inp.slide_id)
        except (MonaiWsiExtError, OSError, ValueError) as e:
            failed[inp.slide_id] = f"{type(e).__name__}: {e}"
            logger.error("%s: failed, skipped (%s)", inp.image, e)
    metas.update(earlier)
    datalist: dict[str, list] = {}
    for sid in sorted(metas):
        datalist.setdefault(metas[sid]["split"], []).extend(datalist_items(metas[sid], output_dir))
    write_json_atomic(output_dir / "datalist.json", datalist)
    summary = {"done": done, "skipped": skipped, "failed": failed, "kept": sorted(earlier),
               "datalist": str(output_dir / "datalist.json"),
               "slides": {k: {"split": v["split"], "counts": v["counts"], "status": slide_status(v)}
                          for k, v in sorted(metas.items())},
               "warnings": summary_warnings(metas, dataset_warnings)}
    write_json_atomic(output_dir / "summary.json", summary)
    return summary


def _earlier_slides(output_dir: Path, exclude: set[str]) -> dict[str, dict]:
    """Complete prepared slides of earlier runs in ``output_dir`` that are not among this run's inputs."""
    out = {}
    for meta_path in sorted(output_dir.glob("*/meta.json")):
        meta = _read_meta(meta_path.parent)
        if meta is None or meta.get("slide_id") in exclude or "split" not in meta:
            continue
        problem = prepared_is_valid(meta_path.parent, meta)
        if problem:
            logger.warning("%s: left out of the datalist (%s); prepare that slide again", meta_path.parent, problem)
            continue
        out[str(meta["slide_id"])] = meta
    return out


def _check_split_moves(inputs: Sequence[SlideInput], output_dir: Path) -> None:
    moved = []
    for inp in inputs:
        meta = _read_meta(output_dir / inp.slide_id)
        if meta is not None and meta.get("split") not in (None, inp.split):
            moved.append(f"{inp.slide_id} (prepared as {meta['split']!r}, now given as {inp.split!r})")
    if moved:
        raise ConfigError(f"{output_dir}: slide(s) already prepared in this folder under another split: "
                          f"{', '.join(moved)}. A slide belongs to one split; use another --output_dir, or "
                          "--overwrite to move it.")


# ----------------------------------------------------------------------------------------------------------------
# reliability helpers (warnings for the summary, declared-negative slides, unmatched annotations, timeouts)

#: splits whose slides must be labelled (annotation file or declared negative)
LABELLED_SPLITS = ("training", "validation")


def _keep_warnings(notes: list[str], warnings: list[str] | None) -> None:
    for note in notes:
        logger.warning("%s", note)
    if warnings is not None:
        warnings.extend(notes)


def _declared_negative(value) -> bool:
    """A manifest's ``negative`` value: true, 1 or the strings true/yes/1 declare the slide tumor-free."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1)


def _mark_negative(inputs: list[SlideInput], negative: bool | Sequence[str]) -> list[SlideInput]:
    if negative is True:
        for inp in inputs:
            inp.extra["negative"] = True
        return inputs
    if not negative:
        return inputs
    wanted = {str(n) for n in ([negative] if isinstance(negative, str) else negative)}
    by_key = {}
    for inp in inputs:
        by_key[inp.slide_id] = inp
        by_key.setdefault(Path(inp.image).stem, inp)
    unknown = sorted(wanted - set(by_key))
    if unknown:
        raise ConfigError(f"`negative` names slide(s) that are not among the inputs: {unknown}")
    for name in wanted:
        by_key[name].extra["negative"] = True
    return inputs


def unmatched_annotations(inputs: Sequence[SlideInput], annotations_dir: str | os.PathLike) -> list[str]:
    """Warnings for annotation files in ``annotations_dir`` that belong to none of ``inputs`` (a typo in a file
    name, or annotations of slides that are missing: their slides are not labelled)."""
    folder = Path(annotations_dir)
    if not folder.is_dir():
        return [f"{folder}: annotation folder not found"]
    used = {Path(i.annotation).name for i in inputs if i.annotation}
    stems = {Path(i.image).stem for i in inputs} | {i.slide_id for i in inputs}
    out = []
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        is_annotation = suffix in ANNOTATION_SUFFIXES or (p.stem.endswith("_mask") and suffix in (".tif", ".png"))
        if not is_annotation or p.name in used or p.name in ("manifest.json", "datalist.json", "summary.json"):
            continue
        stem = p.stem[:-len("_mask")] if p.stem.endswith("_mask") else p.stem
        if stem in stems:
            continue
        out.append(f"{p}: annotation file matches no slide (no slide named {stem!r}); it is not used")
    return out


def label_warnings(inp: SlideInput, cfg: PrepareConfig | None = None) -> list[str]:
    """Warnings about how a slide will be labelled, before it is prepared.

    A slide of a labelled split (``training``/``validation``) with neither an annotation file nor a declaration
    that it is tumor-free (manifest ``"negative": true``, ``collect_inputs(negative=...)``) gets all its tissue
    marked ``nolabel``: that is reported. A slide declared negative that also has an annotation file is labelled
    from the annotation; that is reported too.
    """
    cfg = cfg or PrepareConfig()
    negative = bool(inp.extra.get("negative", False))
    if inp.split in LABELLED_SPLITS and not inp.annotation and not negative:
        return [f"{inp.image}: {inp.split} slide without an annotation file and not declared negative "
                "(manifest \"negative\": true): all its tissue is left unlabelled (nolabel) and it adds no "
                "training patches"]
    if negative and inp.annotation:
        return [f"{inp.image}: declared negative but has the annotation {inp.annotation}; labelled from the "
                "annotation"]
    if negative and not cfg.exhaustive:
        return [f"{inp.image}: declared negative, but exhaustive=False leaves its tissue unlabelled"]
    return []


def slide_meta_extras(slide, tissue, grid: PatchGrid, notes: Sequence[str] = ()) -> dict:
    """The ``warnings`` and ``status`` entries of a slide's ``meta.json``: ``notes`` (from :func:`label_warnings`
    and ``_label_mask_for(..., warnings=notes)``), the slide's own (no mpp, ...), tissue detection's (sizes with an
    assumed mpp, ink excluded) and a no-tissue note; ``status`` is ``no_tissue`` for an empty grid, else ``ok``."""
    out = list(notes) + [f"{slide.path}: {w}" for w in getattr(slide, "warnings", [])]
    out += [f"{slide.path}: {w}" for w in getattr(tissue, "warnings", [])]
    ink = float(getattr(tissue, "ink_fraction", 0.0) or 0.0)
    if ink >= 0.001:
        out.append(f"{slide.path}: {100 * ink:.1f}% of the thumbnail excluded from tissue as pen marks")
    status = "no_tissue" if len(grid) == 0 else "ok"
    if status == "no_tissue":
        out.append(f"{slide.path}: no tissue: no patch-grid cell reaches the tissue threshold; the slide adds no "
                   f"patches (tissue is {100 * tissue.fraction:.2f}% of the thumbnail)")
    return {"warnings": list(dict.fromkeys(out)), "status": status}


def slide_status(meta: dict) -> str:
    """``no_tissue`` for a prepared slide whose grid has no cell, else ``ok``."""
    return "no_tissue" if int(meta.get("counts", {}).get("cells", 0)) == 0 else "ok"


def validate_prepare_config(cfg: PrepareConfig) -> None:
    """Check the settings whose bad values would otherwise fail every slide one by one (or, worse, run).

    Raises:
        ConfigError: ``mpp``/``target_mpp`` not positive, ``slide_timeout_s`` negative, or
            ``annotation_max_outside_fraction`` outside [0, 1].
    """
    from monai_wsi_ext.io.wsi import validate_mpp

    validate_mpp(cfg.mpp, "mpp")
    validate_mpp(cfg.target_mpp, "target_mpp")
    timeout = getattr(cfg, "slide_timeout_s", None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not np.isfinite(timeout) or timeout < 0):
        raise ConfigError(f"`slide_timeout_s` must be a positive number of seconds (None or 0: no limit), got "
                          f"{timeout!r}.")
    frac = getattr(cfg, "annotation_max_outside_fraction", 1.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= float(frac) <= 1.0:
        raise ConfigError(f"`annotation_max_outside_fraction` must be in [0, 1], got {frac!r}.")


def slide_timeout_for(cfg: PrepareConfig, inp: SlideInput):
    """The per-slide time limit of ``cfg`` (``cfg.slide_timeout_s``, None: no limit) as a context manager."""
    from monai_wsi_ext.io.wsi import slide_timeout

    return slide_timeout(getattr(cfg, "slide_timeout_s", None), inp.image)


def summary_warnings(metas: dict, dataset_warnings: Sequence[str] = ()) -> dict:
    """The ``warnings`` entry of ``summary.json``: every per-slide warning (``meta["warnings"]``) by slide id,
    and the dataset-level ones (annotation files that match no slide, ...) under ``"dataset"``."""
    out: dict = {"dataset": list(dataset_warnings)} if dataset_warnings else {}
    for sid, meta in metas.items():
        notes = list(meta.get("warnings") or [])
        if notes:
            out[sid] = notes
    return out



# ----------------------------------------------------------------------------------------------------------------
# the prepare workflow of bundle/configs/prepare.json and scripts/prepare_dataset.py

def settings_from_bundle(config_files: Sequence[str | os.PathLike], **overrides) -> PrepareConfig:
    """The :class:`PrepareConfig` of the bundle configs' ``prepare`` section (``common.json#prepare``, which
    inference on new slides reads too, and an overlay's, e.g. ``configs/datasets/camelyon16.json``).

    Args:
        config_files: bundle config files, merged in order.
        overrides: parser overrides (``patch_size``, ``mpp``, ``prepare#tumor_threshold``...).

    Raises:
        ConfigError: the ``prepare`` section has a key that is not a :class:`PrepareConfig` field.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(overrides)
    return settings_from_parser(parser)


def settings_from_parser(parser) -> PrepareConfig:
    """The :class:`PrepareConfig` of a read ``monai.bundle.ConfigParser``'s ``prepare`` section.

    Raises:
        ConfigError: the section has a key that is not a :class:`PrepareConfig` field.
    """
    return prepare_config(parser.get_parsed_content("prepare"))


def prepare_config(settings: PrepareConfig | dict | None) -> PrepareConfig:
    """A :class:`PrepareConfig` from a config's ``prepare`` section (a dict; a config is returned as is).

    Raises:
        ConfigError: a key that is not a :class:`PrepareConfig` field, naming the known ones.
    """
    from dataclasses import fields

    if isinstance(settings, PrepareConfig):
        return settings
    settings = dict(settings or {})
    known = sorted(f.name for f in fields(PrepareConfig))
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"`prepare` has unknown setting(s) {unknown}; known: {known}")
    return PrepareConfig(**settings)


def run_prepare(output_dir: str | os.PathLike, cfg: PrepareConfig, slides=None, annotations=None, manifest=None,
                split: str = "training", negative: bool | Sequence[str] = False, overwrite: bool = False,
                exit_on_failure: bool = True, progress: bool = True) -> dict:
    """Collect the inputs, prepare them and print what was done (the ``run`` of ``prepare.json``).

    Annotation files in ``annotations`` that match no slide go to the summary's warnings. With
    ``exit_on_failure`` a failed slide ends the process with status 1 after the others are done (and a bad
    setting or input with status 2), without a traceback.
    """
    try:
        inputs = collect_inputs(slides=slides, annotations=annotations, manifest=manifest, split=str(split),
                                negative=negative)
        notes = unmatched_annotations(inputs, annotations) if annotations is not None and manifest is None else []
        summary = prepare_dataset(inputs, output_dir, cfg, overwrite=bool(overwrite), progress=progress,
                                  dataset_warnings=notes)
    except (ConfigError, ValueError) as e:
        if not exit_on_failure:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_summary(summary, len(inputs), output_dir))
    if summary["failed"] and exit_on_failure:
        raise SystemExit(1)
    return summary


def format_summary(summary: dict, n_inputs: int, output_dir: str | os.PathLike) -> str:
    """The lines ``prepare_dataset.py`` prints: slides done/skipped/failed, patches per split, warnings."""
    per_split: dict[str, dict[str, int]] = {}
    for info in summary["slides"].values():
        counts = per_split.setdefault(info["split"], {})
        for key, n in info["counts"].items():
            counts[key] = counts.get(key, 0) + n
    done, skipped, failed = summary["done"], summary["skipped"], summary["failed"]
    lines = [f"{n_inputs} slide(s) -> {Path(output_dir)}: {len(done)} done, {len(skipped)} skipped (already "
             f"prepared), {len(failed)} failed" + (f"; {len(summary['kept'])} from earlier runs kept"
                                                   if summary.get("kept") else "")]
    lines += [f"  FAILED {slide_id}: {reason}" for slide_id, reason in failed.items()]
    for split_name, c in sorted(per_split.items()):
        lines.append(f"  {split_name}: {c.get('cells', 0)} patches ({c.get('tumor', 0)} tumor, {c.get('normal', 0)} "
                     f"normal, {c.get('nolabel', 0)} without label)")
    no_tissue = sorted(k for k, v in summary["slides"].items() if v.get("status") == "no_tissue")
    if no_tissue:
        lines.append(f"  no tissue (no patches): {', '.join(no_tissue)}")
    n_warn = sum(len(v) for v in summary.get("warnings", {}).values())
    if n_warn:
        lines.append(f"  {n_warn} warning(s), listed in {Path(output_dir) / 'summary.json'} (\"warnings\")")
    lines.append(f"datalist: {summary['datalist']}")
    return "\n".join(lines)
