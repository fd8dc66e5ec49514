"""Slide -> tissue mask -> labelled patch grid, for one slide or a batch, with atomic outputs.

Per slide ``<output_dir>/<slide_id>/`` holds ``patches.csv`` (the patch table), ``tissue_mask.png`` (with its
downsample in a PNG text chunk) and ``meta.json`` (slide geometry, grid shape, counts, the settings used). The
batch writes ``datalist.json`` (MONAI ``PatchWSIDataset`` items, grouped by split) and ``summary.json``
(which slides failed and why). ``meta.json`` is written last, so a slide with a ``meta.json`` is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.prep.grid import PatchGrid, PatchLabel, label_cells, make_grid, read_patch_table, write_patch_table
from monai_wsi_ext.io.atomic import write_json_atomic
from monai_wsi_ext.prep.tissue import TissueMask, detect_tissue, save_mask_png
from monai_wsi_ext.io.wsi import Slide, open_slide
from monai_wsi_ext.utils import split_set

__all__ = ["PrepareConfig", "SlideInput", "PreparedSlide", "reader_mpp", "prepare_in_memory", "write_prepared",
           "load_prepared", "load_prepared_slides", "prepare_slide", "prepare_dataset", "collect_inputs", "datalist_items"]

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

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        polygons, (width, height), max_outside_fraction=float(getattr(cfg, "annotation_max_outside_fraction", 1.0)),
        clip=bool(getattr(cfg, "clip_annotations", False)), path_for_errors=path)
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
    slide = slide or open_slide(inp.image, backend=cfg.backend, mpp=inp.extra.get("mpp", cfg.mpp))
    try:
        level = slide.level_for_mpp(cfg.target_mpp, cfg.mpp_rtol) if cfg.target_mpp else int(cfg.level)
        if not 0 <= level < slide.level_count:
            raise MonaiWsiExtError(f"{inp.image}: level {level} requested but the slide has {slide.level_count}")
        tissue = detect_tissue(slide, level=cfg.tissue_level, max_size=cfg.thumbnail_max_size,
                               channel=cfg.tissue_channel, min_object_um2=cfg.min_object_um2,
                               min_hole_um2=cfg.min_hole_um2, external_mask=inp.tissue_mask)
        grid = make_grid(inp.slide_id, slide.dimensions, tissue.mask, tissue.downsample, cfg.patch_size, level,
                         slide.level_downsamples[level], cfg.tissue_threshold)
        if inp.annotation:
            label_mask, label_ds = _label_mask_for(inp, cfg, slide.dimensions, grid.cell_size)
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
    if len(grid) == 0:
        logger.warning("%s: no patch-grid cell has >= %.0f%% tissue (tissue is %.2f%% of the thumbnail); the slide "
                       "contributes no patches", inp.image, 100 * cfg.tissue_threshold, 100 * tissue.fraction)
    return PreparedSlide(inp.slide_id, meta["image"], grid, meta, slide=slide, tissue=tissue)


def write_prepared(prepared: PreparedSlide, output_dir: str | os.PathLike) -> dict:
    """Write a slide's prepared folder (tissue mask, patch table, then ``meta.json`` last: its presence marks the
    slide as complete) and return the meta."""
    out = Path(output_dir) / prepared.slide_id
    out.mkdir(parents=True, exist_ok=True)
    save_mask_png(out / "tissue_mask.png", prepared.tissue)
    write_patch_table(out / "patches.csv", prepared.grid)
    write_json_atomic(out / "meta.json", prepared.meta)
    prepared.dir = str(out)
    return prepared.meta


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


def load_prepared(slide_dir: str | os.PathLike) -> PreparedSlide:
    """A prepared slide read back from its folder (``meta.json`` and ``patches.csv``)."""
    slide_dir = Path(slide_dir)
    meta = json.loads((slide_dir / "meta.json").read_text())
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
            st = Path(p).stat()
            sig[key] = [str(Path(p).resolve()), st.st_size, int(st.st_mtime)]
    return sig


def _is_done(inp: SlideInput, output_dir: Path, cfg: PrepareConfig) -> dict | None:
    meta_path = output_dir / inp.slide_id / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("config_fingerprint") != cfg.fingerprint() or meta.get("input_signature") != _signature(inp):
        return None
    return meta


def datalist_items(meta: dict, output_dir: str | os.PathLike, include_nolabel: bool = False) -> list[dict]:
    """MONAI ``PatchWSIDataset`` items for one prepared slide.

    Each item has ``image`` (slide path), ``location`` (level-0 ``[y, x]``, MONAI's order), ``size``
    (``[h, w]`` at ``level``), ``level``, ``label`` (1 tumor / 0 normal; nolabel omitted unless asked) and the
    grid position ``row``/``col`` and ``slide_id``.

    ``location`` is the patch's top-left corner: with MONAI's ``PatchWSIDataset`` pass ``center_location=False``
    (its default treats locations as centres and would shift every patch by half its size).
    """
    import csv

    items = []
    with open(Path(output_dir) / meta["slide_id"] / "patches.csv", newline="") as f:
        for d in csv.DictReader(f):
            label = int(d["label"])
            if label == PatchLabel.NOLABEL and not include_nolabel:
                continue
            items.append({"image": meta["image"], "location": [int(d["y"]), int(d["x"])],
                          "size": [int(d["patch_size"])] * 2, "level": int(d["level"]), "label": label,
                          "row": int(d["row"]), "col": int(d["col"]), "slide_id": meta["slide_id"]})
    return items


def collect_inputs(slides: str | os.PathLike | list | None = None, annotations: str | os.PathLike | None = None,
                   manifest: str | os.PathLike | None = None, split: str = "training",
                   negative: bool | Sequence[str] = False) -> list[SlideInput]:
    """Build the list of slides to prepare.

    Args:
        slides: a folder of slides, one slide file, or a list of slide files.
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
    if isinstance(slides, (list, tuple)):
        files = [Path(s) for s in slides]
    elif Path(slides).is_dir():
        files = sorted(p for p in Path(slides).iterdir() if p.suffix.lower() in SLIDE_SUFFIXES
                       and not p.stem.endswith("_mask"))
    else:
        files = [Path(slides)]
    if not files:
        where = f"folder {str(slides)!r}" if not isinstance(slides, (list, tuple)) else "the empty list given"
        raise ConfigError(f"no slides found in {where} (slide suffixes: {', '.join(SLIDE_SUFFIXES)}).")
    ann_dir = Path(annotations) if annotations is not None else None
    inputs = []
    for f in files:
        folder = ann_dir or f.parent
        # lexists: a broken or looping annotation link is taken, so that reading it fails loudly instead of the
        # slide silently having no annotation
        ann = next((folder / f"{f.stem}{s}" for s in ANNOTATION_SUFFIXES if os.path.lexists(folder / f"{f.stem}{s}")),
                   None)
        if ann is None:
            masks = (folder / f"{f.stem}_mask{s}" for s in (".tif", ".png"))
            ann = next((m for m in masks if os.path.lexists(m)), None)
        inputs.append(SlideInput(image=str(f), annotation=str(ann) if ann else None, split=_split_name(split)))
    if ann_dir is not None:
        for note in unmatched_annotations(inputs, ann_dir):
            logger.warning("%s", note)
    return _mark_negative(inputs, negative)


def _split_name(split: str) -> str:
    aliases = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
               "validation": "validation", "test": "test"}
    return aliases.get(split.strip().lower(), split) if isinstance(split, str) else split


def prepare_dataset(inputs: list[SlideInput], output_dir: str | os.PathLike, cfg: PrepareConfig | None = None,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Prepare every slide; a slide that fails is reported and skipped, the others finish.

    Returns:
        the summary (also written to ``summary.json``): ``done``, ``skipped`` (already prepared), ``failed``
        (slide id -> reason) and the datalist path.
    """
    cfg = cfg or PrepareConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ids = [i.slide_id for i in inputs]
    dupes = {s for s in ids if ids.count(s) > 1}
    if dupes:
        raise ValueError(f"slide ids must be unique, these repeat: {sorted(dupes)}")
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
            metas[inp.slide_id] = prepare_slide(inp, output_dir, cfg)
            done.append(inp.slide_id)
        except (MonaiWsiExtError, OSError, ValueError) as e:
            failed[inp.slide_id] = f"{type(e).__name__}: {e}"
            logger.error("%s: failed, skipped (%s)", inp.image, e)
    datalist: dict[str, list] = {}
    for inp in inputs:
        if inp.slide_id in metas:
            datalist.setdefault(inp.split, []).extend(datalist_items(metas[inp.slide_id], output_dir))
    write_json_atomic(output_dir / "datalist.json", datalist)
    summary = {"done": done, "skipped": skipped, "failed": failed, "datalist": str(output_dir / "datalist.json"),
               "slides": {k: {"split": v["split"], "counts": v["counts"]} for k, v in metas.items()}}
    write_json_atomic(output_dir / "summary.json", summary)
    return summary


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

