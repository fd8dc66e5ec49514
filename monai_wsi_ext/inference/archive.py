"""Batch inference over an archive of slides: only new or changed slides are inferred, and an index of every slide
(CSV and JSON) records its status, slide score and class and its output paths.

:func:`run_archive` (the command ``scripts/batch_inference.py``), in one process or under ``torchrun``:

1. rank 0 lists the slides (:func:`list_archive`: a folder, searched recursively, a glob pattern, or a CSV with an
   ``image`` column) and compares each with its entry from earlier runs (``<output_dir>/index_entries/<id>.json``):
   a slide is to do when it has no entry, when its entry failed, when its file changed (size or modification time;
   with ``checksum="sha256"`` only when its content changed: a slide whose size or time changed is hashed and
   redone only when the SHA-256 differs from the entry's, and an entry without a hash, made in ``stat`` mode, counts
   as changed), when the model or the inference settings changed (``model_key``), when its heatmap record is gone,
   or when its file moved. The slides to do go to ``<output_dir>/index_todo.json`` (a dataset manifest).
2. every rank runs the bundle's ``inference.json`` with ``archive_inference.json`` layered on it over that manifest:
   the slides are dealt out over the ranks by file size
   (:class:`~monai_wsi_ext.distributed.ShardedSlideDataset`), each slide's heatmaps are written by one rank, and right
   after each slide its entry is written atomically (:class:`ArchiveEntryWriter`), so a killed run loses at most the
   slides in progress; progress and the ETA are logged (:class:`~monai_wsi_ext.distributed.SlideProgress`).
3. after a barrier rank 0 writes ``index.json`` and ``index.csv`` (atomically) from the entries: one row per slide,
   the slides of earlier listings that are no longer listed kept with ``listed`` false.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from monai_wsi_ext.engines.handlers import attach_once, slide_batch_item
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.io.atomic import is_temporary_name, write_json_atomic, write_text_atomic
from monai_wsi_ext.prep.prepare import SLIDE_SUFFIXES
from monai_wsi_ext.utils import file_sha256

__all__ = ["ArchiveSlide", "list_archive", "file_signature", "model_key", "ArchiveEntryWriter", "plan_archive",
           "write_index", "run_archive", "INDEX_COLUMNS"]

logger = logging.getLogger(__name__)

#: the columns of ``index.csv`` (and the keys of each slide in ``index.json``)
INDEX_COLUMNS = ("slide_id", "image", "status", "slide_score", "slide_class", "n_patches", "n_regions", "seconds",
                 "error", "processed_utc", "rank", "size_bytes", "mtime_ns", "sha256", "model_key", "listed",
                 "output_dir", "record_json", "prob_npy", "heatmap_tiff", "tumor_geojson", "overlay_png")

_OUTPUT_FILES = {"record_json": "_record.json", "prob_npy": "_prob.npy", "heatmap_tiff": "_heatmap.tif",
                 "tumor_geojson": "_tumor.geojson", "overlay_png": "_overlay.png"}
_DONE = ("ok", "no_tissue")


class ArchiveSlide(dict):
    """One listed slide: ``slide_id``, ``image`` (absolute path) and its file signature (``size_bytes``,
    ``mtime_ns``, ``sha256`` when computed)."""


def _is_slide(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.stem.endswith("_mask") \
        and not is_temporary_name(p.name)


def list_archive(source: str | os.PathLike) -> list[ArchiveSlide]:
    """The slides of an archive, sorted by slide id.

    Args:
        source: a folder (its slide files, searched recursively; ``*_mask`` files are annotations, not slides), a
            glob pattern (``archive/2024-*/*.svs``; ``**`` recurses), or a CSV file with an ``image`` (or ``path``)
            column and optionally ``slide_id`` (relative paths are taken from the CSV's folder).

    Returns:
        The slides; the slide id is the file stem unless the CSV gives one.

    Raises:
        ConfigError: no slide found, a CSV without an ``image`` column or naming a missing file, or two slides with
            the same id (name them in a CSV with a ``slide_id`` column).
    """
    text = os.fspath(source)
    path = Path(text)
    ids: list[str | None] = []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_slide(p))
        ids = [None] * len(files)
        dicom, dicom_ids = _dicom_series(path)
        files, ids = files + dicom, ids + dicom_ids
        where = f"folder {text!r}"
    elif path.suffix.lower() == ".csv" and path.is_file():
        files, ids = _read_csv(path)
        where = f"CSV {text!r}"
    elif any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if _is_slide(Path(p)))
        ids = [None] * len(files)
        where = f"glob pattern {text!r}"
    elif path.is_file():
        files, ids, where = [path], [None], f"file {text!r}"
    else:
        raise ConfigError(f"`slides` must be a folder, a glob pattern, a CSV file or a slide file; {text!r} is none "
                          "of these (it does not exist).")
    if not files:
        raise ConfigError(f"no slides found in {where} (slide suffixes: {', '.join(SLIDE_SUFFIXES)}).")
    slides = [ArchiveSlide(slide_id=str(sid) if sid else f.stem, image=str(f.resolve())) for f, sid in zip(files, ids)]
    seen: dict[str, str] = {}
    dupes = []
    for s in slides:
        if s["slide_id"] in seen:
            dupes.append(f"{s['slide_id']}: {seen[s['slide_id']]} and {s['image']}")
        seen[s["slide_id"]] = s["image"]
    if dupes:
        raise ConfigError(f"{where}: slide ids must be unique (they name the output folders), these repeat: "
                          f"{dupes[:5]}; list the slides in a CSV with a `slide_id` column.")
    for s in slides:
        if not s["slide_id"] or "/" in s["slide_id"] or s["slide_id"] in (".", ".."):
            raise ConfigError(f"{where}: {s['slide_id']!r} is not a usable slide id (a plain file-name stem).")
    return sorted(slides, key=lambda s: s["slide_id"])


def _dicom_series(folder: Path) -> tuple[list[Path], list[str]]:
    """Every DICOM WSI series under ``folder`` (an archive keeps every series; the Deploy app's ``largest`` rule
    is for one study): the series' folder when it holds one series (slide id: the folder's name), else its level-0
    instance (ids from :func:`~monai_wsi_ext.io.dicom.series_slide_ids`)."""
    from monai_wsi_ext.io.dicom import dicom_files, find_wsi_series, series_slide_ids

    if not dicom_files(folder, recursive=True):
        return [], []
    by_folder: dict[Path, list] = {}
    for series in find_wsi_series(folder, recursive=True):  # ConfigError naming the `dicom` extra without pydicom
        by_folder.setdefault(Path(series.folder), []).append(series)
    files, ids = [], []
    for where, found in sorted(by_folder.items()):
        for series, sid in zip(found, series_slide_ids(where.name, found)):
            files.append(where if len(found) == 1 else Path(series.level0.path))
            ids.append(sid)
    return files, ids


def _read_csv(path: Path) -> tuple[list[Path], list[str | None]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path}: the CSV has no rows.")
    column = next((c for c in ("image", "path") if c in rows[0]), None)
    if column is None:
        raise ConfigError(f"{path}: the CSV needs an `image` (or `path`) column with the slide files; it has "
                          f"{list(rows[0])}.")
    files, ids = [], []
    for n, row in enumerate(rows, start=2):
        value = (row.get(column) or "").strip()
        if not value:
            raise ConfigError(f"{path}, line {n}: empty `{column}`.")
        f = Path(value) if Path(value).is_absolute() else path.parent / value
        if not f.exists():
            raise ConfigError(f"{path}, line {n}: slide {value!r} does not exist ({f}).")
        files.append(f)
        ids.append((row.get("slide_id") or "").strip() or None)
    return files, ids


def file_signature(path: str | os.PathLike, sha256: bool = False) -> dict:
    """``{"size_bytes", "mtime_ns", "sha256"}`` of a slide file (``sha256`` None unless asked for). For a DICOM
    series folder: the total size and latest modification time of its DICOM files, and a SHA-256 over their names
    and SHA-256s, so that a changed, added or removed instance changes the signature."""
    p = Path(path)
    if p.is_dir():
        from monai_wsi_ext.io.dicom import dicom_files

        files = dicom_files(p)
        stats = [f.stat() for f in files]
        digest = None
        if sha256:
            digest = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)};" for f in files).encode()).hexdigest()
        return {"size_bytes": sum(st.st_size for st in stats), "mtime_ns": max((st.st_mtime_ns for st in stats),
                                                                                default=p.stat().st_mtime_ns),
                "sha256": digest}
    st = p.stat()
    return {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path) if sha256 else None}


def model_key(weights: dict, settings: dict) -> str:
    """Identity of the model and of the inference settings that shape the outputs: SHA-256 over the weights files'
    SHA-256 and the settings (a change of either redoes every slide)."""
    blob = {"weights": {k: file_sha256(v) for k, v in sorted(weights.items()) if v}, "settings": settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_entries(entries_dir: Path) -> dict[str, dict]:
    out = {}
    if not entries_dir.is_dir():
        return out
    for p in sorted(entries_dir.glob("*.json")):
        if is_temporary_name(p.name):
            continue
        try:
            e = json.loads(p.read_text())
        except (OSError, ValueError):
            logger.warning("%s: unreadable index entry, the slide is redone", p)
            continue
        if isinstance(e, dict) and e.get("slide_id"):
            out[str(e["slide_id"])] = e
    return out


def _why_todo(slide: ArchiveSlide, old: dict | None, key: str, heatmap_dir: Path, checksum: str) -> str | None:
    """Why a listed slide is to be inferred, or None when its earlier result stands (and its signature is
    completed from the entry)."""
    if old is None:
        return "new"
    if old.get("status") not in _DONE:
        return f"retry ({old.get('status')})"
    if old.get("model_key") != key:
        return "model or settings changed"
    if old.get("image") != slide["image"]:
        return "moved"
    record = heatmap_dir / slide["slide_id"] / f"{slide['slide_id']}_record.json"
    if not record.is_file():
        return "outputs missing"
    same_stat = (old.get("size_bytes"), old.get("mtime_ns")) == (slide["size_bytes"], slide["mtime_ns"])
    if same_stat:
        slide["sha256"] = old.get("sha256")
        return None
    if checksum == "sha256" and old.get("sha256"):
        slide["sha256"] = file_signature(slide["image"], sha256=True)["sha256"]
        return None if slide["sha256"] == old["sha256"] else "changed"
    return "changed"


def plan_archive(slides: list[ArchiveSlide], output_dir: str | os.PathLike, key: str,
                 checksum: str = "stat") -> tuple[list[ArchiveSlide], dict[str, str]]:
    """The slides to do and why: ``(todo, reasons)``, reasons slide id -> why (``new``, ``changed``, ...)."""
    if checksum not in ("stat", "sha256"):
        raise ConfigError(f"`checksum` must be 'stat' (size and modification time) or 'sha256', got {checksum!r}.")
    out = Path(output_dir)
    entries = _read_entries(out / "index_entries")
    todo, reasons = [], {}
    for s in slides:
        s.update(file_signature(s["image"]))
        old = entries.get(s["slide_id"])
        why = _why_todo(s, old, key, out / "heatmaps", checksum)
        if why is None and (old["size_bytes"], old["mtime_ns"]) != (s["size_bytes"], s["mtime_ns"]):
            # same content under a new time stamp (sha256 mode): the entry takes the new signature, so that the
            # slide is not hashed again next time
            write_json_atomic(out / "index_entries" / f"{s['slide_id']}.json",
                              {**old, "size_bytes": s["size_bytes"], "mtime_ns": s["mtime_ns"]})
        if why is not None:
            if checksum == "sha256" and not s.get("sha256"):
                s["sha256"] = file_signature(s["image"], sha256=True)["sha256"]
            todo.append(s)
            reasons[s["slide_id"]] = why
    return todo, reasons


class ArchiveEntryWriter:
    """After each slide of an archive run (after the :class:`~monai_wsi_ext.outputs.handlers.HeatmapWriter`): the
    slide's index entry ``<entries_dir>/<slide_id>.json`` (atomically): the file signature and ``model_key`` from
    the run's manifest, ``status`` (``ok``, ``no_tissue`` or ``failed`` with ``error``), ``slide_score``,
    ``slide_class`` (``tumor`` when the score is at least ``class_threshold``, else ``normal``; None without
    tissue), patch and region counts, seconds, the rank, and the output paths.

    Args:
        manifest: the run's ``index_todo.json`` (slides with their signatures, and the ``model_key``).
        entries_dir: where the entries go.
        class_threshold: slide score at which a slide is called ``tumor``.
    """

    def __init__(self, manifest: str | os.PathLike, entries_dir: str | os.PathLike, class_threshold: float = 0.5):
        data = json.loads(Path(manifest).read_text())
        self.key = data["model_key"]
        self.slides = {str(r["id"]): r for r in data["slides"]}
        self.entries_dir, self.class_threshold = Path(entries_dir), float(class_threshold)
        self._attached: set[int] = set()

    def attach(self, engine: Engine) -> None:
        attach_once(engine, self._attached, [(Events.ITERATION_COMPLETED, self)])

    def __call__(self, engine: Engine) -> None:
        item = slide_batch_item(engine)
        sid = str(item.get("slide_id"))
        results = getattr(engine.state, "results", {}) or {}
        failed = getattr(engine.state, "failed", {}) or {}
        rec = self.slides.get(sid, {})
        rank = int(os.environ.get("RANK", 0))
        entry: dict[str, Any] = {"slide_id": sid, "image": rec.get("image"), "size_bytes": rec.get("size_bytes"),
                                 "mtime_ns": rec.get("mtime_ns"), "sha256": rec.get("sha256"),
                                 "model_key": self.key, "rank": rank,
                                 "processed_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if sid in results:
            r = results[sid]
            score = r.get("slide_score")
            label = None if score is None else ("tumor" if score >= self.class_threshold else "normal")
            entry.update(status=r.get("status", "ok"), slide_score=score, error=None, slide_class=label,
                         n_patches=r.get("n_patches"), n_regions=r.get("n_regions"), seconds=r.get("seconds"),
                         output_dir=r.get("dir"))
            folder = Path(r["dir"])
            for name, suffix in _OUTPUT_FILES.items():
                f = folder / f"{sid}{suffix}"
                entry[name] = str(f) if f.is_file() else None
        else:
            entry.update(status="failed", error=failed.get(sid, "no output was written"), slide_score=None,
                         slide_class=None)
        write_json_atomic(self.entries_dir / f"{sid}.json", entry)


def write_index(output_dir: str | os.PathLike, listed: Sequence[str], source: str, key: str) -> dict:
    """``index.json`` and ``index.csv`` (atomically) from the entries in ``<output_dir>/index_entries``: one row per
    slide with an entry, ``listed`` telling whether the current listing holds it.

    Returns:
        The index (``source``, ``model_key``, ``updated_utc``, ``counts`` by status, ``slides``).
    """
    out = Path(output_dir)
    entries = _read_entries(out / "index_entries")
    listed_set = set(listed)
    rows = []
    for sid in sorted(entries):
        e = dict(entries[sid])
        e["listed"] = sid in listed_set
        rows.append({c: e.get(c) for c in INDEX_COLUMNS})
    counts: dict[str, int] = {}
    for r in rows:
        if r["listed"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    index = {"source": source, "model_key": key, "updated_utc": now, "counts": counts, "slides": rows}
    write_json_atomic(out / "index.json", index)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(INDEX_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    write_text_atomic(out / "index.csv", buf.getvalue())
    return index


def _parser(config_files: Sequence[str], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    for k, v in overrides.items():
        parser[k] = v
    return parser


_KEY_SETTINGS = ("mode", "threshold", "canvas_size", "canvas_mode", "crop_size", "stain_normalize", "patch_size",
                 "patch_level", "prepare", "backbone", "canvas_prob_channel")


def run_archive(slides: str | os.PathLike, output_dir: str | os.PathLike, config_files: Sequence[str],
                overrides: dict | None = None, checksum: str = "stat", dry_run: bool = False) -> dict:
    """Infer the new and changed slides of an archive and update its index (see the module doc).

    Args:
        slides: the archive: a folder, a glob pattern or a CSV (see :func:`list_archive`).
        output_dir: the archive's output folder (``heatmaps/``, ``index_entries/``, ``index.json``, ``index.csv``).
        config_files: the bundle configs: ``common.json``, ``inference.json``, ``archive_inference.json`` and any
            overlay (e.g. a dataset overlay).
        overrides: config overrides (``ckpt_dir``, ``encoder_ckpt``, ``mode``, ``threshold``, ...).
        checksum: ``stat`` (a slide changed when its size or modification time did) or ``sha256`` (when its content
            did).
        dry_run: only plan: return what would be done.

    Returns:
        ``{"listed", "todo" (slide id -> why), "index"}`` (``index`` None for a dry run), the same on every rank.

    Raises:
        ConfigError: a bad archive listing, an unknown or ill-typed override (checked against ``config_files``, as
            ``monai.bundle run`` overrides are), or a bad setting (on every rank).
        MonaiWsiExtError: when a slide failed (after the index is written; its entry says why).
    """
    from monai_wsi_ext.distributed import broadcast_object, init_distributed, run_sharded

    rank, world = init_distributed()
    out = Path(output_dir).resolve()
    overrides = {**dict(overrides or {}), "output_dir": str(out)}
    plan: dict[str, Any]
    if rank == 0:
        try:
            from monai_wsi_ext.config_check import check_overrides

            check_overrides(list(config_files), {k: v for k, v in overrides.items() if k != "output_dir"})
            parser = _parser(config_files, overrides)
            mode = parser.get_parsed_content("mode")
            weights = {"encoder": parser.get_parsed_content("encoder_ckpt"),
                       "unet": parser.get_parsed_content("unet_ckpt") if mode == "canvas" else None}
            key = model_key(weights, {k: parser.get_parsed_content(k) for k in _KEY_SETTINGS})
            listed = list_archive(slides)
            todo, reasons = plan_archive(listed, out, key, checksum)
            plan = {"key": key, "listed": [s["slide_id"] for s in listed], "todo": reasons}
            if not dry_run and todo:
                records = [{"id": s["slide_id"], "image": s["image"], "split": "archive", "size_bytes": s["size_bytes"],
                            "mtime_ns": s["mtime_ns"], "sha256": s.get("sha256")} for s in todo]
                write_json_atomic(out / "index_todo.json", {"model_key": key, "slides": records})
        except (ConfigError, MonaiWsiExtError, OSError) as e:
            plan = {"error": str(e), "config": isinstance(e, ConfigError), "kind": type(e).__name__}
        else:
            counts: dict[str, int] = {}
            for why in reasons.values():
                counts[why] = counts.get(why, 0) + 1
            logger.info("archive %s: %d slide(s) listed, %d to do (%s), %d unchanged", slides, len(listed), len(todo),
                        ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "-", len(listed) - len(todo))
    else:
        plan = None
    plan = broadcast_object(plan)
    if "error" in plan:  # raised on every rank
        raise ConfigError(plan["error"]) if plan["config"] else MonaiWsiExtError(f"{plan['kind']}: {plan['error']}")
    result = {"listed": plan["listed"], "todo": plan["todo"], "index": None}
    if dry_run:
        return result
    if plan["todo"]:
        t0 = time.perf_counter()
        parser = _parser(config_files, overrides)
        parser.get_parsed_content("determinism")
        evaluator = parser.get_parsed_content("evaluator")
        run_sharded(evaluator)
        logger.info("rank %d: %d slide(s) in %.1f s", rank, len(evaluator.data_loader), time.perf_counter() - t0)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    index = None
    if rank == 0:
        try:
            index = write_index(out, plan["listed"], str(slides), plan["key"])
        except Exception as e:  # noqa: BLE001 - sent to every rank, so that none waits for the index
            index = {"error": f"writing the index failed: {type(e).__name__}: {e}"}
    index = broadcast_object(index)
    if "error" in index:
        raise MonaiWsiExtError(index["error"])
    result["index"] = index
    failed = {r["slide_id"]: r["error"] for r in index["slides"] if r["listed"] and r["status"] == "failed"}
    logger.info("archive index: %s -> %s", index["counts"], out / "index.csv")
    if failed:
        raise MonaiWsiExtError(f"{len(failed)} slide(s) of the archive failed (see {out / 'index.csv'}): {failed}")
    return result
