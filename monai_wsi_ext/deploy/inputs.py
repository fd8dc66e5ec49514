"""The Deploy application's input: slide files and DICOM WSI series in an input folder (no MONAI Deploy needed).

A MONAI Deploy input folder may hold slide files (``.svs``, ``.tif``, ...; see
:func:`monai_wsi_ext.prep.prepare.collect_inputs`) and DICOM files at any depth: a study's series as the archive
sent them, flat or one folder per series. The DICOM files are grouped into WSI series (:mod:`monai_wsi_ext.io.dicom`:
SOP class VL Whole Slide Microscopy Image Storage, Image Type VOLUME; label, overview and thumbnail images and other
SOP classes, e.g. an earlier run's Segmentation, are left out) and then selected:

- ``largest`` (default): the one series whose level 0 has the largest total pixel matrix (ties: the smaller Series
  Instance UID). One slide per run, as MONAI Deploy runs one study at a time.
- ``all``: every WSI series is a slide.

Slide files are all taken, whatever the rule.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from monai_wsi_ext.errors import ConfigError

__all__ = ["DICOM_SERIES_RULES", "input_slides"]

logger = logging.getLogger(__name__)

DICOM_SERIES_RULES = ("largest", "all")


def input_slides(path: str | os.PathLike, dicom_series: str = "largest") -> list[str]:
    """The slides of a Deploy input: its slide files and its selected DICOM WSI series.

    A selected series is given as its folder when the folder holds no other WSI series (the slide id is the
    folder's name), else as its level-0 instance file (see :func:`monai_wsi_ext.io.dicom.series_slide_ids`).

    Args:
        path: the input folder (or one slide file, or one DICOM instance file).
        dicom_series: ``largest`` or ``all`` (see the module notes).

    Raises:
        ConfigError: the path does not exist, an unknown rule, or no slide at all.
    """
    from monai_wsi_ext.io.dicom import dicom_files, find_wsi_series, is_dicom_slide, select_wsi_series
    from monai_wsi_ext.prep.prepare import collect_inputs

    if dicom_series not in DICOM_SERIES_RULES:
        raise ConfigError(f"`dicom_series` (WSI_CANVAS_DICOM_SERIES) must be one of {DICOM_SERIES_RULES}, got "
                          f"{dicom_series!r}.")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"input {str(path)!r} does not exist.")
    if path.is_file():
        return [inp.image for inp in collect_inputs(slides=path)]
    series = find_wsi_series(path, recursive=True) if dicom_files(path, recursive=True) else []
    chosen = select_wsi_series(series, dicom_series)
    if len(series) > len(chosen):
        logger.info("%s: %d DICOM WSI series; %s taken (rule %r: the largest total pixel matrix, %s px)", path,
                    len(series), chosen[0].series_uid, dicom_series, "x".join(map(str, chosen[0].dimensions)))
    per_folder = Counter(s.folder for s in series)
    slides = [str(s.folder) if per_folder[s.folder] == 1 else str(s.level0.path) for s in chosen]
    try:
        files = [inp.image for inp in collect_inputs(slides=path) if not is_dicom_slide(inp.image)]
    except ConfigError:
        if not slides:
            raise
        files = []
    if not files and not slides:
        raise ConfigError(f"no slides found in {str(path)!r} (slide files, or DICOM WSI series of VL Whole Slide "
                          "Microscopy VOLUME images).")
    return files + slides
