"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage): finding a slide's series in a folder.

A DICOM slide is a *series* of instances, usually one file per pyramid level (plus label, overview and thumbnail
images), stored in one folder. This module reads the instances' headers (``pydicom``, the ``dicom`` extra; no pixel
data is read) and groups them into :class:`WsiSeries`; pixels are read by OpenSlide 4, which opens a DICOM WSI from
any of its instance files and finds the other levels of the same series in that file's folder
(:func:`monai_wsi_ext.io.wsi.open_slide` routes every DICOM input there).

Selection rule, used wherever one slide must be picked from DICOM files (a slide folder, the Deploy application's
input): instances of SOP class VL Whole Slide Microscopy Image Storage whose Image Type has ``VOLUME`` (pyramid
levels; ``LABEL``, ``OVERVIEW`` and ``THUMBNAIL`` images are left out), grouped by Series Instance UID; the series'
level 0 is its VOLUME instance with the largest total pixel matrix; among several series, the one whose level 0 is
largest comes first (:func:`select_wsi_series`).

The mpp of a DICOM slide is the level-0 instance's Pixel Spacing (shared functional groups, millimetres, in the
order row spacing (y), column spacing (x)) times 1000. OpenSlide 4 reports the same numbers as ``openslide.mpp-y``
and ``openslide.mpp-x``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monai_wsi_ext.errors import ConfigError, WSIReadError

__all__ = ["WSM_SOP_CLASS_UID", "DicomInstance", "WsiSeries", "is_dicom_file", "dicom_files", "is_dicom_slide",
           "read_instances", "group_wsi_series", "find_wsi_series", "select_wsi_series", "resolve_wsi_series",
           "require_pydicom", "series_slide_ids"]

logger = logging.getLogger(__name__)

#: SOP Class UID of VL Whole Slide Microscopy Image Storage
WSM_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"
_DICOM_SUFFIXES = (".dcm", ".dicom")
_EXTRA_HINT = 'reading DICOM whole-slide images needs the `dicom` extra: pip install -e ".[dicom]"'


def require_pydicom():
    """The ``pydicom`` module, or :class:`ConfigError` naming the ``dicom`` extra."""
    try:
        import pydicom
    except ImportError as e:
        raise ConfigError(f"pydicom is not installed; {_EXTRA_HINT}") from e
    return pydicom


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble); cheap, no pydicom needed."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The DICOM files in ``folder`` (sorted; hidden files left out), optionally in its sub-folders too: files named
    ``*.dcm``/``*.dicom``, without a suffix, or with a numeric one (``1.2.840...5``), that start as DICOM Part 10."""
    folder = Path(folder)
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for p in pattern:
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() in _DICOM_SUFFIXES or p.suffix == "" or p.suffix[1:].isdigit():
            if is_dicom_file(p):
                found.append(p)
    return sorted(found)


def is_dicom_slide(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file or a folder holding DICOM files directly (a DICOM slide's series)."""
    path = Path(path)
    if path.is_dir():
        try:
            return bool(dicom_files(path))
        except OSError:
            return False
    return path.is_file() and is_dicom_file(path)


@dataclass(frozen=True)
class DicomInstance:
    """The header fields of one DICOM instance that slide selection and DICOM outputs need."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str | None
    image_type: tuple[str, ...]
    columns: int  # TotalPixelMatrixColumns (Columns when absent)
    rows: int  # TotalPixelMatrixRows
    pixel_spacing: tuple[float, float] | None  # mm, (row spacing = y, column spacing = x)
    series_number: int | None = None
    series_description: str = ""
    container_identifier: str = ""

    @property
    def is_wsi_volume(self) -> bool:
        return self.sop_class_uid == WSM_SOP_CLASS_UID and "VOLUME" in self.image_type

    @property
    def total_pixels(self) -> int:
        return int(self.columns) * int(self.rows)


def _pixel_spacing(ds) -> tuple[float, float] | None:
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq_name)
        if groups:
            measures = groups[0].get("PixelMeasuresSequence")
            if measures and measures[0].get("PixelSpacing"):
                r, c = measures[0].PixelSpacing
                return float(r), float(c)
    if ds.get("PixelSpacing"):
        r, c = ds.PixelSpacing
        return float(r), float(c)
    return None


def read_instances(files: Iterable[str | os.PathLike]) -> list[DicomInstance]:
    """The headers of DICOM files (pixel data not read); a file that cannot be parsed is logged and left out.

    Raises:
        ConfigError: pydicom is not installed (the ``dicom`` extra).
    """
    pydicom = require_pydicom()
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            number = ds.get("SeriesNumber")
            out.append(DicomInstance(
                path=Path(f), sop_class_uid=sop_class, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                study_uid=str(ds.get("StudyInstanceUID", "")), series_uid=str(ds.get("SeriesInstanceUID", "")),
                frame_of_reference_uid=str(ds.FrameOfReferenceUID) if ds.get("FrameOfReferenceUID") else None,
                image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
                columns=int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0),
                rows=int(ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0),
                pixel_spacing=_pixel_spacing(ds), series_number=int(number) if number not in (None, "") else None,
                series_description=str(ds.get("SeriesDescription", "") or ""),
                container_identifier=str(ds.get("ContainerIdentifier", "") or ""),
            ))
        except Exception as e:  # noqa: BLE001 - a corrupt header fails in many ways
            logger.warning("%s: not a readable DICOM file (%s: %s); left out", f, type(e).__name__, e)
    return out


@dataclass
class WsiSeries:
    """One DICOM WSI series: its VOLUME instances and the level-0 one (largest total pixel matrix).

    Attributes:
        series_uid, study_uid, frame_of_reference_uid: the series' identity (the DICOM outputs reference them).
        level0: the VOLUME instance with the largest total pixel matrix (what OpenSlide is given).
        volumes: every VOLUME instance of the series, largest first.
        others: the series' other WSM instances (label, overview, thumbnail).
    """

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str | None
    level0: DicomInstance
    volumes: list[DicomInstance]
    others: list[DicomInstance] = field(default_factory=list)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``: the total pixel matrix."""
        return self.level0.columns, self.level0.rows

    @property
    def mpp_xy(self) -> tuple[float, float] | None:
        """Level-0 µm per pixel ``(x, y)`` from the Pixel Spacing, or None when the instance has none."""
        sp = self.level0.pixel_spacing
        return None if sp is None else (sp[1] * 1000.0, sp[0] * 1000.0)

    @property
    def folder(self) -> Path:
        return self.level0.path.parent

    def signature(self) -> list:
        """``[level-0 file, total bytes, latest mtime]`` of the series' files (the prepare step's input check)."""
        files = [i.path for i in (*self.volumes, *self.others)]
        stats = [p.stat() for p in files]
        return [str(self.level0.path.resolve()), int(sum(s.st_size for s in stats)),
                int(max(s.st_mtime for s in stats))]

    def summary(self) -> dict:
        """What a slide's ``meta.json`` and run record keep of the series."""
        return {"study_instance_uid": self.study_uid, "series_instance_uid": self.series_uid,
                "frame_of_reference_uid": self.frame_of_reference_uid,
                "sop_instance_uid": self.level0.sop_instance_uid, "level0_file": str(self.level0.path),
                "total_pixel_matrix": list(self.dimensions), "pixel_spacing_mm": list(self.level0.pixel_spacing or []),
                "n_volume_instances": len(self.volumes), "series_number": self.level0.series_number,
                "container_identifier": self.level0.container_identifier}


def group_wsi_series(instances: Iterable[DicomInstance]) -> list[WsiSeries]:
    """Group instances into WSI series (only series with a VOLUME instance), largest level 0 first."""
    by_series: dict[str, list[DicomInstance]] = {}
    for inst in instances:
        if inst.sop_class_uid == WSM_SOP_CLASS_UID:
            by_series.setdefault(inst.series_uid, []).append(inst)
    out = []
    for uid, members in by_series.items():
        volumes = sorted((i for i in members if i.is_wsi_volume), key=lambda i: (-i.total_pixels, str(i.path)))
        if not volumes:
            continue
        level0 = volumes[0]
        out.append(WsiSeries(uid, level0.study_uid, level0.frame_of_reference_uid, level0, volumes,
                             [i for i in members if not i.is_wsi_volume]))
    return select_wsi_series(out, "all")


def select_wsi_series(series: Sequence[WsiSeries], rule: str = "largest") -> list[WsiSeries]:
    """Order (``all``) or pick (``largest``: the one series with the largest level-0 total pixel matrix) WSI
    series; ties are broken by Series Instance UID so the choice is reproducible.

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in ("largest", "all"):
        raise ValueError(f"`rule` must be 'largest' or 'all', got {rule!r}.")
    ordered = sorted(series, key=lambda s: (-s.level0.total_pixels, s.series_uid))
    return ordered[:1] if rule == "largest" else ordered


def find_wsi_series(path: str | os.PathLike, recursive: bool = False) -> list[WsiSeries]:
    """The WSI series of a folder's DICOM files (or of the series a DICOM file belongs to, looked up in its
    folder), largest first.

    Raises:
        ConfigError: pydicom is not installed.
    """
    path = Path(path)
    if path.is_dir():
        return group_wsi_series(read_instances(dicom_files(path, recursive)))
    own = read_instances([path])
    if not own:
        return []
    members = read_instances(p for p in dicom_files(path.parent) if p != path)
    series = [s for s in group_wsi_series([*own, *members]) if s.series_uid == own[0].series_uid]
    return series


def resolve_wsi_series(path: str | os.PathLike) -> WsiSeries:
    """The one WSI series a slide path names: a folder holding one WSI series, or any instance file of a series.

    Raises:
        WSIReadError: no WSI series there, or a folder with several (name one instance file of the series, or put
            each series in its own folder); ConfigError when pydicom is missing.
    """
    path = Path(path)
    series = find_wsi_series(path)
    if not series:
        what = "folder" if path.is_dir() else "file"
        raise WSIReadError(path, f"DICOM {what} without a VL Whole Slide Microscopy VOLUME image (SOP class "
                                 f"{WSM_SOP_CLASS_UID}, Image Type with VOLUME)")
    if len(series) > 1:
        uids = ", ".join(s.series_uid for s in series)
        raise WSIReadError(path, f"the folder holds {len(series)} DICOM WSI series ({uids}); give one instance file "
                                 "of the series to read, or put each series in a folder of its own")
    return series[0]


def series_slide_ids(folder_name: str, series: Sequence[WsiSeries]) -> list[str]:
    """Slide ids for the WSI series found in one folder: the folder's name for a single series; otherwise the
    folder's name and the Series Number (or, without one or when two share it, a short hash of the Series
    Instance UID)."""
    if len(series) == 1:
        return [folder_name]
    numbers = [s.level0.series_number for s in series]
    ids = []
    for s, n in zip(series, numbers):
        if n is not None and numbers.count(n) == 1:
            ids.append(f"{folder_name}_s{n}")
        else:
            ids.append(f"{folder_name}_{hashlib.sha256(s.series_uid.encode()).hexdigest()[:8]}")
    return ids
