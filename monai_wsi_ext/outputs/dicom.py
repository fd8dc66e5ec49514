"""DICOM results for a DICOM slide: the tumor probability map as a DICOM Segmentation, the tumor regions as
Microscopy Bulk Simple Annotations (``highdicom``, the ``dicom`` extra).

Both objects reference the source slide (the level-0 VOLUME instance of its WSI series, see
:mod:`monai_wsi_ext.io.dicom`): the same Study Instance UID, the source series and instance in the Referenced Series
Sequence; the Segmentation has the slide's Frame of Reference UID, the annotations (2D coordinates, which DICOM ties
to an image rather than to a frame of reference) name the level-0 instance in the Referenced Image Sequence. A DICOM
viewer of whole-slide images overlays them on the slide.

Geometry of the Segmentation: its total pixel matrix is the probability grid, one pixel per grid cell, with the
slide's orientation (Image Orientation (Slide)) and a pixel spacing of ``cell_size`` times the slide's level-0
Pixel Spacing. DICOM positions are pixel centres (the Total Pixel Matrix Origin is the location of pixel 1\\1, which
highdicom's spatial transforms take as its centre), so the Segmentation's origin is the slide position of the
centre of the first grid cell: the slide's origin moved by ``(cell_size - 1) / 2`` level-0 pixels along the rows and
the columns. Segmentation pixel ``(row r, column c)`` then covers slide level-0 pixels ``x in [c * cell_size,
(c + 1) * cell_size)``, ``y in [r * cell_size, (r + 1) * cell_size)``, exactly the grid cell of
``{slide_id}_prob.npy``. The pixel matrix is tiled like the source (its tile size; frames without any non-zero pixel
are left out, as DICOM allows).

Values: ``FRACTIONAL`` (probability type, ``round(255 * p)``; no-tissue cells 0) or ``BINARY`` (1 where
``p >= threshold``). Polygons of the bulk annotations are 2D (``SCOORD``) image coordinates of the slide's total
pixel matrix, ``(column, row)`` with the top left corner of the top left pixel at ``(0, 0)``: the level-0 ``(x, y)``
of the file outputs as they are. DICOM polygons have no holes: each region is written as its exterior ring; its
area measurement is that of the region's cells (holes excluded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import atomic_path

__all__ = ["SEG_TYPES", "require_highdicom", "source_dataset", "write_dicom_seg", "write_dicom_annotations"]

logger = logging.getLogger(__name__)

#: the DICOM Segmentation types written (``write_dicom_seg``)
SEG_TYPES = ("fractional", "binary")
_MANUFACTURER = "monai-wsi-canvas"
_MODEL_NAME = "feature-canvas U-Net (research use, not for diagnosis)"


def require_highdicom():
    """The ``highdicom`` module, or :class:`ConfigError` naming the ``dicom`` extra."""
    try:
        import highdicom
    except ImportError as e:
        raise ConfigError('DICOM outputs need highdicom, the `dicom` extra: pip install -e ".[dicom]"') from e
    return highdicom


def source_dataset(source):
    """The source image's header as a pydicom ``Dataset`` (no pixel data): from a
    :class:`~monai_wsi_ext.io.dicom.WsiSeries` (its level-0 instance), a file path, or a ``Dataset`` as is."""
    import pydicom

    if isinstance(source, pydicom.Dataset):
        return source
    path = getattr(getattr(source, "level0", None), "path", None) or source
    return pydicom.dcmread(path, stop_before_pixels=True)


def _version() -> str:
    from monai_wsi_ext import __version__

    return str(__version__)


def _algorithm(hd):
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name="monai-wsi-canvas feature-canvas U-Net",
                                              family=codes.DCM.ArtificialIntelligence, version=_version())


def _check_prob(prob) -> np.ndarray:
    arr = np.asarray(prob, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"`prob` must be a non-empty (H, W) grid, got shape {arr.shape}.")
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
        raise ValueError(f"`prob` must hold probabilities in [0, 1] (NaN for no tissue), got values in "
                         f"[{finite.min()}, {finite.max()}].")
    return np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)


def write_dicom_seg(path: str | os.PathLike, prob: np.ndarray, cell_size: float, source,
                    segmentation_type: str = "fractional", threshold: float = 0.5, series_number: int = 900,
                    series_instance_uid: str | None = None) -> Path:
    """Write the probability grid as a DICOM Segmentation on the source slide's total-pixel-matrix geometry.

    Args:
        path: destination ``.dcm`` (written atomically).
        prob: ``(H, W)`` probabilities in [0, 1], NaN for no tissue (stored as 0).
        cell_size: grid cell size in level-0 pixels of the source.
        source: the slide's :class:`~monai_wsi_ext.io.dicom.WsiSeries`, its level-0 instance file or header.
        segmentation_type: ``fractional`` (probabilities, 8 bits) or ``binary`` (``p >= threshold``).
        threshold: the tumor threshold of ``binary``.
        series_number: Series Number of the new series.
        series_instance_uid: its Series Instance UID (new when None).

    Returns:
        The path written.

    Raises:
        ConfigError: highdicom is not installed.
        ValueError: a bad ``prob``, ``cell_size`` or ``segmentation_type``, or a source without Pixel Spacing.
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    if segmentation_type not in SEG_TYPES:
        raise ValueError(f"`segmentation_type` must be one of {SEG_TYPES}, got {segmentation_type!r}.")
    arr = _check_prob(prob)
    cell = float(cell_size)
    if not (np.isfinite(cell) and cell > 0):
        raise ValueError(f"`cell_size` must be a positive number of level-0 pixels, got {cell_size!r}.")
    ds = source_dataset(source)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0] if \
        ds.get("SharedFunctionalGroupsSequence") else None
    if measures is None or not measures.get("PixelSpacing"):
        raise ValueError(f"{getattr(ds, 'filename', 'source')}: no Pixel Spacing in the shared functional groups; "
                         "cannot place a segmentation on the slide")
    row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
    pixel_measures = hd.PixelMeasuresSequence(pixel_spacing=(row_mm * cell, col_mm * cell),
                                              slice_thickness=float(measures.get("SliceThickness") or 0.0) or None)
    # the centre of the first cell: image coordinates (cell / 2, cell / 2) of the slide's total pixel matrix, whose
    # (0, 0) is the top left corner of its first pixel
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(ds, for_total_pixel_matrix=True)
    first_centre = to_slide(np.array([[cell / 2, cell / 2]]))[0]
    plane_position = hd.PlanePositionSequence(hd.CoordinateSystemNames.SLIDE, [float(v) for v in first_centre],
                                              pixel_matrix_position=(1, 1))
    if segmentation_type == "fractional":
        pixels, kind = arr, hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels, kind = (arr >= float(threshold)).astype(np.uint8), hd.seg.SegmentationTypeValues.BINARY
    label = "Tumor probability" if segmentation_type == "fractional" else f"Tumor (p >= {float(threshold):g})"
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(hd))
    seg = hd.seg.Segmentation(
        source_images=[ds], pixel_array=pixels[None], segmentation_type=kind, segment_descriptions=[segment],
        series_instance_uid=series_instance_uid or hd.UID(), series_number=int(series_number),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_MANUFACTURER, manufacturer_model_name=_MODEL_NAME,
        software_versions=_version(), device_serial_number="none",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY if segmentation_type == "fractional"
        else None,
        max_fractional_value=255, content_label="TUMOR_MAP",
        content_description=f"Tumor {'probability' if segmentation_type == 'fractional' else 'mask'} per patch-grid "
                            f"cell ({cell:g} px); research use, not for diagnosis"[:64],
        pixel_measures=pixel_measures, plane_positions=[plane_position], tile_pixel_array=True,
        series_description=f"Tumor {segmentation_type} segmentation (monai-wsi-canvas)"[:64],
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    logger.debug("Wrote DICOM %s segmentation %s (%d x %d cells)", segmentation_type, path, arr.shape[1],
                 arr.shape[0])
    return Path(path)


def write_dicom_annotations(path: str | os.PathLike, regions: Sequence[dict], source, series_number: int = 901,
                            series_instance_uid: str | None = None) -> Path:
    """Write :func:`~monai_wsi_ext.outputs.writers.tumor_regions` as a Microscopy Bulk Simple Annotations object:
    one annotation group "Tumor regions" of 2D polygons (exterior rings in level-0 pixel coordinates) with
    two measurements per region, its area (mm², when the slide has an mpp) and its mean tumor probability.

    Args:
        path: destination ``.dcm`` (written atomically).
        regions: the region dicts (``polygon``, ``area_mm2``, ``mean_probability``).
        source: the slide's :class:`~monai_wsi_ext.io.dicom.WsiSeries`, its level-0 instance file or header.
        series_number: Series Number of the new series.
        series_instance_uid: its Series Instance UID (new when None).

    Returns:
        The path written.

    Raises:
        ConfigError: highdicom is not installed.
        ValueError: no regions (DICOM needs at least one annotation in a group).
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    if not regions:
        raise ValueError("no tumor regions to write: an annotation group needs at least one polygon")
    ds = source_dataset(source)
    graphic = [np.asarray(r["polygon"].exterior, dtype=np.float32) for r in regions]
    measurements = [hd.ann.Measurements(
        name=codes.DCM.Probability, unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        values=np.asarray([r["mean_probability"] for r in regions], dtype=np.float32))]
    areas = [r.get("area_mm2") for r in regions]
    if all(a is not None for a in areas):
        measurements.append(hd.ann.Measurements(name=codes.SCT.Area, unit=codes.UCUM.SquareMillimeter,
                                                values=np.asarray(areas, dtype=np.float32)))
    group = hd.ann.AnnotationGroup(
        number=1, uid=hd.UID(), label="Tumor regions",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Neoplasm, graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=graphic, algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(hd), measurements=measurements)
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[ds], annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=[group], series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(series_number), sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_MANUFACTURER,
        manufacturer_model_name=_MODEL_NAME, software_versions=_version(), device_serial_number="none",
        content_description="Tumor regions of the tumor map; research use, not for diagnosis"[:64],
        content_label="TUMOR_REGIONS", series_description="Tumor regions (monai-wsi-canvas)")
    with atomic_path(path) as tmp:
        ann.save_as(tmp)
    logger.debug("Wrote DICOM bulk annotations %s (%d regions)", path, len(regions))
    return Path(path)
