"""Slide annotations: one polygon model, readers for the common formats, writers, and rasterisation.

Coordinates are always level-0 pixel coordinates ``(x, y)`` of the slide, as float arrays of shape ``(K, 2)``.
Every polygon carries a ``label`` from :class:`AnnotationLabel` after class-name mapping. Rings are stored open
(a closing vertex equal to the first one is dropped when reading).

Readers (:func:`read_annotations`):

* ``asap``: ASAP XML as Camelyon16 ships it (groups ``_0``/``_1`` tumor, ``_2`` exclusion).
* ``geojson``: QuPath GeoJSON (FeatureCollection, list of features, single Feature or bare geometry).
* ``imagescope``: Aperio ImageScope XML (``NegativeROA="1"`` regions become holes or exclusions).
* ``ncrf_json``: the Camelyon16 NCRF JSON conversion (``{"positive": [...], "negative": [...]}``).

XML is parsed with :mod:`defusedxml`, so entity bombs and external entities are refused. Every problem with a
file (missing, truncated, unsafe, unknown layout, non-numeric or non-finite coordinates) raises
:class:`~monai_wsi_ext.errors.AnnotationError` naming the file and the problem.

Rasterisation (:func:`rasterize_annotations`) follows the pixel-centre convention: pixel ``(r, c)`` of a mask at
downsample ``d`` covers level-0 ``[c*d, (c+1)*d) x [r*d, (r+1)*d)`` and is inside a polygon when its centre
``((c + 0.5) * d, (r + 0.5) * d)`` is (even-odd rule, the same test as :func:`skimage.draw.polygon` applied to
the vertices ``(x / d - 0.5, y / d - 0.5)``; centres exactly on an edge follow the half-open top-left rule).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import quoteattr

import numpy as np

from monai_wsi_ext.errors import AnnotationError, ConfigError
from monai_wsi_ext.io.atomic import write_text_atomic
from monai_wsi_ext.labels import MASK_NORMAL, MASK_TUMOR, MASK_UNANNOTATED

__all__ = [
    "ANNOTATION_FORMATS",
    "annotation_warnings",
    "check_annotation_extent",
    "AnnotationLabel",
    "AnnotationPolygon",
    "AnnotationWarning",
    "MASK_NORMAL",
    "MASK_TUMOR",
    "MASK_UNANNOTATED",
    "label_mask_level_for",
    "label_mask_level_shapes",
    "map_class_name",
    "polygons_area",
    "rasterize_annotations",
    "read_annotations",
    "read_label_mask",
    "write_asap_xml",
    "write_qupath_geojson",
]

logger = logging.getLogger(__name__)

# MASK_UNANNOTATED, MASK_NORMAL, MASK_TUMOR (imported above from monai_wsi_ext.labels, re-exported here): the values
# of the label masks returned by :func:`rasterize_annotations` and :func:`read_label_mask`

ANNOTATION_FORMATS = ("asap", "geojson", "imagescope", "ncrf_json")
_FORMAT_ALIASES = {"asap": "asap", "asap_xml": "asap", "camelyon16": "asap", "geojson": "geojson",
                   "qupath": "geojson", "imagescope": "imagescope", "aperio": "imagescope", "ncrf_json": "ncrf_json",
                   "ncrf": "ncrf_json"}


class AnnotationWarning(UserWarning):
    """A recoverable problem in annotations: a degenerate polygon skipped, vertices clipped to the slide."""


class AnnotationLabel(str, Enum):
    """Semantic label of an annotation polygon after class-name mapping."""

    TUMOR = "tumor"
    NORMAL = "normal"
    EXCLUDE = "exclude"  # removed from tumor (Camelyon16 group ``_2``); normal only when exhaustively annotated
    OTHER = "other"  # a class the mapping does not know; ignored for labels


@dataclass
class AnnotationPolygon:
    """One polygon, possibly with holes, in level-0 pixel coordinates.

    Args:
        exterior: ``(K, 2)`` float array of ``(x, y)`` vertices (not necessarily closed).
        holes: list of ``(K_i, 2)`` arrays, each a hole removed from the exterior.
        label: the mapped semantic label.
        name: the annotation's name in the source file.
        group: the class or group name in the source file (e.g. ``_0`` or ``Tumor``).
    """

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    label: AnnotationLabel = AnnotationLabel.TUMOR
    name: str = ""
    group: str = ""

    def __post_init__(self):
        self.exterior = np.asarray(self.exterior, dtype=np.float64).reshape(-1, 2)
        self.holes = [np.asarray(h, dtype=np.float64).reshape(-1, 2) for h in self.holes]
        self.label = AnnotationLabel(self.label)

    @property
    def area(self) -> float:
        """Level-0 area in px^2: shoelace area of the exterior minus the holes' areas."""
        return max(_shoelace(self.exterior) - sum(_shoelace(h) for h in self.holes), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# class-name mapping

_DEFAULT_CLASSES = {
    "_0": AnnotationLabel.TUMOR, "_1": AnnotationLabel.TUMOR, "_2": AnnotationLabel.EXCLUDE,
    "tumor": AnnotationLabel.TUMOR, "tumour": AnnotationLabel.TUMOR, "metastasis": AnnotationLabel.TUMOR,
    "metastases": AnnotationLabel.TUMOR, "carcinoma": AnnotationLabel.TUMOR,
    "normal": AnnotationLabel.NORMAL, "stroma": AnnotationLabel.NORMAL, "benign": AnnotationLabel.NORMAL,
    "exclude": AnnotationLabel.EXCLUDE, "exclusion": AnnotationLabel.EXCLUDE, "ignore": AnnotationLabel.EXCLUDE,
}


def _normalise_class_map(class_map: Mapping[str, Any] | None) -> dict[str, AnnotationLabel]:
    if class_map is None:
        return {}
    if not isinstance(class_map, Mapping):
        raise ConfigError(f"`class_map` must be a dict of class name -> label, got {type(class_map).__name__}.")
    out = {}
    for key, value in class_map.items():
        try:
            out[str(key).strip().lower()] = AnnotationLabel(value)
        except ValueError:
            raise ConfigError(
                f"`class_map[{key!r}]` must be one of {[m.value for m in AnnotationLabel]}, got {value!r}."
            ) from None
    return out


def map_class_name(name: str | None, class_map: Mapping[str, Any] | None = None) -> AnnotationLabel | None:
    """Map a class or group name to a label; ``None`` when neither ``class_map`` nor the defaults know it.

    Matching is case-insensitive and ignores surrounding spaces. ``class_map`` wins over the defaults; a QuPath
    derived class such as ``"Tumor: Positive"`` falls back to its base ``"Tumor"``. The defaults are: ``_0``,
    ``_1``, tumor, tumour, metastasis, metastases, carcinoma -> tumor; normal, stroma, benign -> normal; ``_2``,
    exclude, exclusion, ignore and any name starting with ``ignore`` (QuPath's ``Ignore*``) -> exclude.

    Args:
        name: the class name from the file (``""`` or ``None`` for an unclassified object; ``class_map`` may map
            ``""`` to give unclassified objects a label).
        class_map: optional ``{name: label}`` overrides (labels as :class:`AnnotationLabel` or its values).

    Returns:
        The label, or ``None`` for an unknown name.

    Raises:
        ConfigError: ``class_map`` holds a value that is not a label.
    """
    return _lookup(name, _normalise_class_map(class_map))


def _lookup(name: str | None, cmap: dict[str, AnnotationLabel]) -> AnnotationLabel | None:
    key = (name or "").strip().lower()
    keys = [key, key.split(":", 1)[0].strip()] if ":" in key else [key]
    for k in keys:
        if k in cmap:
            return cmap[k]
    for k in keys:
        if k in _DEFAULT_CLASSES:
            return _DEFAULT_CLASSES[k]
        if k.startswith("ignore"):
            return AnnotationLabel.EXCLUDE
    return None


def _resolve_class(candidates: Iterable[str | None], cmap: dict[str, AnnotationLabel]) -> tuple[AnnotationLabel, str]:
    """Label and group of the first candidate name that maps; else ``OTHER`` with the first non-empty name."""
    names = [str(c) for c in candidates if c is not None and str(c).strip()]
    for name in names:
        label = _lookup(name, cmap)
        if label is not None:
            return label, name
    if not names and "" in cmap:
        return cmap[""], ""
    return AnnotationLabel.OTHER, names[0] if names else ""


# ----------------------------------------------------------------------------------------------------------------
# reading


class _Ctx:
    """Per-file reading state: the path for errors, the class map, strictness and skipped-item notes."""

    def __init__(self, path: Path, cmap: dict[str, AnnotationLabel], strict: bool):
        self.path = path
        self.cmap = cmap
        self.strict = strict
        self.skipped: list[str] = []

    def fail(self, reason: str) -> AnnotationError:
        return AnnotationError(self.path, reason)

    def skip(self, what: str) -> None:
        if self.strict:
            raise self.fail(f"{what} (strict=True)")
        self.skipped.append(what)

    def finish(self) -> None:
        if self.skipped:
            shown = "; ".join(self.skipped[:5]) + (f"; ... ({len(self.skipped) - 5} more)" if len(self.skipped) > 5
                                                   else "")
            warnings.warn(f"{self.path}: skipped {len(self.skipped)} item(s) without an area: {shown}",
                          AnnotationWarning, stacklevel=3)


def _number(value: Any, ctx: _Ctx, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.count(",") == 1 and "." not in text:
            text = text.replace(",", ".")  # some ASAP builds write the locale's decimal comma
        try:
            out = float(text)
        except ValueError:
            raise ctx.fail(f"{where}: non-numeric coordinate {value!r}") from None
    elif value is None:
        raise ctx.fail(f"{where}: coordinate missing")
    else:
        raise ctx.fail(f"{where}: coordinate must be a number, got {value!r}")
    if not math.isfinite(out):
        raise ctx.fail(f"{where}: non-finite coordinate {value!r}")
    return out


def _ring(points: np.ndarray, ctx: _Ctx, where: str) -> np.ndarray | None:
    """Drop a closing vertex; return ``None`` (after noting or raising) for rings with < 3 distinct vertices."""
    ring = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(np.unique(ring, axis=0)) < 3:
        ctx.skip(f"{where}: degenerate polygon with {len(ring)} vertices (< 3 distinct)")
        return None
    return ring


def _json_ring(ring: Any, ctx: _Ctx, where: str) -> np.ndarray | None:
    if not isinstance(ring, list):
        raise ctx.fail(f"{where}: a ring must be a list of [x, y] positions, got {type(ring).__name__}")
    pts = np.empty((len(ring), 2), dtype=np.float64)
    for k, pos in enumerate(ring):
        if not isinstance(pos, (list, tuple)) or len(pos) < 2:
            raise ctx.fail(f"{where}: vertex {k} must be [x, y], got {pos!r:.80}")
        pts[k, 0] = _number(pos[0], ctx, f"{where} vertex {k}")
        pts[k, 1] = _number(pos[1], ctx, f"{where} vertex {k}")
    return _ring(pts, ctx, where)


def _parse_xml(data: bytes, ctx: _Ctx) -> Element:
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    try:
        return fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise ctx.fail(f"unsafe XML refused ({type(e).__name__}: {e}); entity declarations are not allowed") from None
    except ParseError as e:
        raise ctx.fail(f"malformed or truncated XML ({e})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ctx.fail(f"XML could not be parsed ({type(e).__name__}: {e})") from None


def _parse_json(data: bytes, ctx: _Ctx) -> Any:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ctx.fail(f"JSON is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ctx.fail(f"malformed or truncated JSON ({e})") from None
    except (RecursionError, ValueError) as e:
        raise ctx.fail(f"JSON could not be parsed ({type(e).__name__}: {e})") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _sniff(data: bytes, ctx: _Ctx) -> tuple[str, Any]:
    """Return (format, parsed document) decided by the content, not the file name."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (some Windows tools)
        try:
            head = data.decode("utf-16").lstrip()[:1].encode()
        except UnicodeDecodeError as e:
            raise ctx.fail(f"file starts with a UTF-16 byte-order mark but is not UTF-16 ({e})") from None
    else:
        head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"<":
        root = _parse_xml(data, ctx)
        tag = _local(root.tag)
        if tag == "ASAP_Annotations":
            return "asap", root
        if tag == "Annotations":
            return "imagescope", root
        raise ctx.fail(f"unknown XML annotation layout: root tag <{tag}> (expected <ASAP_Annotations> or "
                       "<Annotations>)")
    if head in (b"{", b"["):
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            data = data.decode("utf-16").encode("utf-8")
        doc = _parse_json(data, ctx)
        return _json_kind(doc, ctx), doc
    raise ctx.fail(f"not an XML or JSON annotation file (starts with {data[:16]!r}); expected one of "
                   f"{ANNOTATION_FORMATS}")


def _json_kind(doc: Any, ctx: _Ctx) -> str:
    if isinstance(doc, list):
        return "geojson"
    if isinstance(doc, dict):
        if "type" in doc:
            return "geojson"
        if "positive" in doc or "negative" in doc:
            return "ncrf_json"
        raise ctx.fail(f"unknown JSON annotation layout: keys {sorted(doc)[:8]} (expected GeoJSON 'type' or NCRF "
                       "'positive'/'negative')")
    raise ctx.fail(f"unknown JSON annotation layout: top level is a {type(doc).__name__}")


def read_annotations(
    path: str | os.PathLike,
    fmt: str = "auto",
    class_map: Mapping[str, str | AnnotationLabel] | None = None,
    *,
    strict: bool = False,
) -> list[AnnotationPolygon]:
    """Read slide annotations as polygons in level-0 pixel coordinates.

    Class names are mapped with ``class_map`` first (case-insensitive; key ``""`` for unclassified objects),
    then the defaults of :func:`map_class_name`; unknown classes become :attr:`AnnotationLabel.OTHER`.
    Format specifics:

    * ``asap``: ``PartOfGroup`` is the class (``_0``/``_1`` tumor, ``_2`` exclude; other names through the
      mapping, then through the group's parent groups). A file holding nothing but ``_2`` polygons (the NCRF
      normal-slide outlines written as ASAP) has them labelled normal, matching the NCRF JSON. Holes are not
      nested: exclusion polygons stay separate polygons.
    * ``geojson``: the class is ``properties.classification.name`` (QuPath 0.2+), a ``classification``
      string, or ``properties.name``/``label``. Polygon and MultiPolygon (one polygon per part) keep holes.
    * ``imagescope``: the class is the Annotation ``Name``, else an Attribute ``Value``, else an Attribute
      ``Name`` other than ``Description``. Regions with ``NegativeROA="1"`` become holes of the region of the
      same annotation that contains them, or exclusion polygons when none does. Two-vertex rectangle and
      ellipse regions are expanded; rulers and arrows are skipped.
    * ``ncrf_json``: ``positive`` -> tumor; ``negative`` -> exclude when the file has positive polygons (normal
      regions inside tumor), else normal (normal-tissue outlines).

    Non-polygon items (points, lines) and degenerate polygons (< 3 distinct vertices) are skipped with one
    :class:`AnnotationWarning` per file, or raise when ``strict``.

    Args:
        path: the annotation file.
        fmt: ``"auto"`` or one of :data:`ANNOTATION_FORMATS` (aliases ``qupath``, ``ncrf``, ``aperio``). The
            format is always sniffed from the content (XML root ``ASAP_Annotations`` vs ``Annotations``; JSON with
            ``positive``/``negative`` keys vs GeoJSON), whatever the extension; an explicit ``fmt`` must agree.
        class_map: ``{class name: label}`` overrides, labels as :class:`AnnotationLabel` or ``"tumor"``,
            ``"normal"``, ``"exclude"``, ``"other"``.
        strict: raise instead of skipping non-polygon items and degenerate polygons.

    Returns:
        The polygons in file order.

    Raises:
        AnnotationError: the file is missing, unreadable, malformed or truncated, unsafe XML (entity
            declarations), of an unknown layout or not of ``fmt``, or has non-numeric/non-finite coordinates.
        ConfigError: ``fmt`` or ``class_map`` is invalid.
    """
    path = Path(path)
    key = str(fmt).strip().lower()
    if key != "auto" and key not in _FORMAT_ALIASES:
        raise ConfigError(f"`fmt` must be 'auto' or one of {ANNOTATION_FORMATS}, got {fmt!r}.")
    ctx = _Ctx(path, _normalise_class_map(class_map), strict)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ctx.fail("annotation file not found") from None
    except OSError as e:
        raise ctx.fail(f"annotation file could not be read ({e})") from None
    if not data.strip():
        raise ctx.fail("annotation file is empty")
    kind, doc = _sniff(data, ctx)
    if key != "auto" and _FORMAT_ALIASES[key] != kind:
        raise ctx.fail(f"`fmt={fmt!r}` was asked for, but the content is {kind!r}")
    reader = {"asap": _read_asap, "geojson": _read_geojson, "imagescope": _read_imagescope,
              "ncrf_json": _read_ncrf}[kind]
    polygons = reader(doc, ctx)
    ctx.finish()
    counts = {lab.value: sum(p.label == lab for p in polygons) for lab in AnnotationLabel}
    logger.debug("%s: read %d polygons as %s %s", path, len(polygons), kind, counts)
    return polygons


def _read_asap(root: Element, ctx: _Ctx) -> list[AnnotationPolygon]:
    parents: dict[str, str] = {}
    groups_el = root.find("AnnotationGroups")
    if groups_el is not None:
        for g in groups_el.findall("Group"):
            parent = g.get("PartOfGroup", "None")
            if g.get("Name") and parent and parent != "None":
                parents[g.get("Name")] = parent
    anns = root.find("Annotations")
    out: list[AnnotationPolygon] = []
    from_group2: list[int] = []
    if anns is None:
        return out
    for i, ann in enumerate(anns.findall("Annotation")):
        name = ann.get("Name", f"Annotation {i}")
        where = f"Annotation {i} ({name!r})"
        kind = (ann.get("Type") or "Polygon").strip().lower()
        if kind in ("dot", "pointset", "point", "measurement", "ruler", "arrow", "line"):
            ctx.skip(f"{where}: type {ann.get('Type')!r}")
            continue
        coords_el = ann.find("Coordinates")
        coords = [] if coords_el is None else coords_el.findall("Coordinate")
        pts = np.empty((len(coords), 2), dtype=np.float64)
        orders = []
        for k, c in enumerate(coords):
            pts[k, 0] = _number(c.get("X"), ctx, f"{where} coordinate {k} X")
            pts[k, 1] = _number(c.get("Y"), ctx, f"{where} coordinate {k} Y")
            orders.append(c.get("Order"))
        try:
            order = np.argsort([int(float(o)) for o in orders], kind="stable")
            pts = pts[order]
        except (TypeError, ValueError):
            pass  # no usable Order attributes: keep document order
        ring = _ring(pts, ctx, where)
        if ring is None:
            continue
        group = ann.get("PartOfGroup") or ""
        group = "" if group == "None" else group  # ASAP's "no group"
        chain, seen = [], set()
        g = group
        while g and g not in seen:
            chain.append(g)
            seen.add(g)
            g = parents.get(g, "")
        label, grp = _resolve_class(chain, ctx.cmap)
        if grp == "_2" and "_2" not in ctx.cmap:
            from_group2.append(len(out))
        out.append(AnnotationPolygon(ring, [], label, name, group))
    if from_group2 and not any(p.label in (AnnotationLabel.TUMOR, AnnotationLabel.NORMAL) for p in out):
        # only exclusion polygons: there is nothing to exclude them from, they outline normal tissue (NCRF)
        for j in from_group2:
            out[j].label = AnnotationLabel.NORMAL
        logger.info("%s: no tumor or normal polygons; %d '_2' polygons read as normal tissue", ctx.path,
                    len(from_group2))
    return out


def _read_ncrf(doc: dict, ctx: _Ctx) -> list[AnnotationPolygon]:
    unknown = set(doc) - {"positive", "negative"}
    if unknown:
        logger.debug("%s: NCRF JSON has extra keys %s (ignored)", ctx.path, sorted(unknown))
    positive = doc.get("positive", [])
    negative = doc.get("negative", [])
    for key, items in (("positive", positive), ("negative", negative)):
        if not isinstance(items, list):
            raise ctx.fail(f"NCRF JSON '{key}' must be a list of {{'name', 'vertices'}}, got {type(items).__name__}")
    out: list[AnnotationPolygon] = []
    for key, items in (("positive", positive), ("negative", negative)):
        if key in ctx.cmap:
            label = ctx.cmap[key]
        elif key == "positive":
            label = AnnotationLabel.TUMOR
        else:
            label = AnnotationLabel.EXCLUDE if positive else AnnotationLabel.NORMAL
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "vertices" not in item:
                raise ctx.fail(f"NCRF JSON '{key}'[{i}] must be an object with 'vertices', got {item!r:.80}")
            name = str(item.get("name", f"{key} {i}"))
            ring = _json_ring(item["vertices"], ctx, f"'{key}'[{i}] ({name!r})")
            if ring is not None:
                out.append(AnnotationPolygon(ring, [], label, name, key))
    return out


_GEOMETRY_TYPES = {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString",
                   "GeometryCollection"}


def _read_geojson(doc: Any, ctx: _Ctx) -> list[AnnotationPolygon]:
    if isinstance(doc, list):
        features = doc
    elif doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise ctx.fail("GeoJSON FeatureCollection without a 'features' list")
    elif doc.get("type") == "Feature" or doc.get("type") in _GEOMETRY_TYPES:
        features = [doc]
    else:
        raise ctx.fail(f"unknown GeoJSON type {doc.get('type')!r} (expected FeatureCollection, Feature or a "
                       "geometry)")
    out: list[AnnotationPolygon] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise ctx.fail(f"feature {i} must be an object, got {type(feat).__name__}")
        if feat.get("type") in _GEOMETRY_TYPES:
            geometry, props = feat, {}
        elif feat.get("type") == "Feature":
            geometry, props = feat.get("geometry"), feat.get("properties") or {}
            if not isinstance(props, dict):
                raise ctx.fail(f"feature {i}: 'properties' must be an object")
        else:
            raise ctx.fail(f"feature {i}: unknown type {feat.get('type')!r}")
        cls = props.get("classification")
        if isinstance(cls, dict):
            cls_name = cls.get("name")
            if not cls_name and isinstance(cls.get("names"), list):
                cls_name = ": ".join(str(n) for n in cls["names"])
        elif isinstance(cls, str):
            cls_name = cls
        else:
            cls_name = None
        name = props.get("name") if isinstance(props.get("name"), str) else ""
        label_prop = props.get("label") if isinstance(props.get("label"), str) else None
        label, group = _resolve_class([cls_name, name, label_prop], ctx.cmap)
        name = name or str(feat.get("id", f"feature {i}"))
        for ext, holes in _geojson_polygons(geometry, ctx, f"feature {i}"):
            out.append(AnnotationPolygon(ext, holes, label, name, group))
    return out


def _geojson_polygons(geometry: Any, ctx: _Ctx, where: str) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    if geometry is None:
        ctx.skip(f"{where}: no geometry")
        return []
    if not isinstance(geometry, dict):
        raise ctx.fail(f"{where}: geometry must be an object, got {type(geometry).__name__}")
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise ctx.fail(f"{where}: GeometryCollection without a 'geometries' list")
        return [p for j, g in enumerate(parts) for p in _geojson_polygons(g, ctx, f"{where} geometry {j}")]
    if kind not in ("Polygon", "MultiPolygon"):
        if kind in _GEOMETRY_TYPES:
            ctx.skip(f"{where}: {kind} is not an area")
            return []
        raise ctx.fail(f"{where}: unknown geometry type {kind!r}")
    coords = geometry.get("coordinates")
    if not isinstance(coords, list):
        raise ctx.fail(f"{where}: {kind} without a 'coordinates' list")
    polys = [coords] if kind == "Polygon" else coords
    out = []
    for j, rings in enumerate(polys):
        pw = where if kind == "Polygon" else f"{where} part {j}"
        if not isinstance(rings, list) or not rings:
            raise ctx.fail(f"{pw}: a polygon must be a non-empty list of rings")
        ext = _json_ring(rings[0], ctx, f"{pw} exterior")
        if ext is None:
            continue
        holes = [h for k, r in enumerate(rings[1:]) if (h := _json_ring(r, ctx, f"{pw} hole {k}")) is not None]
        out.append((ext, holes))
    return out


def _read_imagescope(root: Element, ctx: _Ctx) -> list[AnnotationPolygon]:
    from skimage.measure import points_in_poly

    out: list[AnnotationPolygon] = []
    for i, ann in enumerate(root.findall("Annotation")):
        attrs = ann.findall("Attributes/Attribute")
        candidates = [ann.get("Name")] + [a.get("Value") for a in attrs] + \
            [a.get("Name") for a in attrs if (a.get("Name") or "").strip().lower() != "description"]
        label, group = _resolve_class(candidates, ctx.cmap)
        ann_name = ann.get("Name") or f"Annotation {ann.get('Id', i)}"
        positives: list[AnnotationPolygon] = []
        negatives: list[tuple[np.ndarray, str]] = []
        for j, reg in enumerate(ann.findall("Regions/Region")):
            where = f"Annotation {ann.get('Id', i)} Region {reg.get('Id', j)}"
            verts = reg.findall("Vertices/Vertex")
            pts = np.empty((len(verts), 2), dtype=np.float64)
            for k, v in enumerate(verts):
                pts[k, 0] = _number(v.get("X"), ctx, f"{where} vertex {k} X")
                pts[k, 1] = _number(v.get("Y"), ctx, f"{where} vertex {k} Y")
            shape = (reg.get("GeoShape") or "").strip().lower()
            rtype = (reg.get("Type") or "").strip()
            if shape in ("line", "arrow", "ruler", "point", "polyline"):
                ctx.skip(f"{where}: {reg.get('GeoShape')} is not an area")
                continue
            if len(pts) == 2 and (shape == "ellipse" or (not shape and rtype == "2")):
                pts = _ellipse(pts)
            elif len(pts) == 2 and (shape == "rectangle" or (not shape and rtype == "1")):
                (x0, y0), (x1, y1) = pts
                pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            ring = _ring(pts, ctx, where)
            if ring is None:
                continue
            text = reg.get("Text") or ""
            if (reg.get("NegativeROA") or "0").strip() == "1":
                negatives.append((ring, text or where))
            else:
                positives.append(AnnotationPolygon(ring, [], label, text or ann_name, group))
        exclusions = []
        for ring, name in negatives:
            host = next((p for p in positives if points_in_poly(ring, p.exterior).all()), None)
            if host is not None:
                host.holes.append(ring)
            else:
                exclusions.append(AnnotationPolygon(ring, [], AnnotationLabel.EXCLUDE, name, group))
        out.extend(positives + exclusions)
    return out


def _ellipse(corners: np.ndarray, n: int = 64) -> np.ndarray:
    (x0, y0), (x1, y1) = corners
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([(x0 + x1) / 2 + abs(x1 - x0) / 2 * np.cos(t), (y0 + y1) / 2 + abs(y1 - y0) / 2 * np.sin(t)], 1)


# ----------------------------------------------------------------------------------------------------------------
# label masks


def read_label_mask(
    path: str | os.PathLike,
    level: int = 0,
    tumor_values: Sequence[int] = (1, 255),
    normal_values: Sequence[int] = (),
    max_pixels: int | None = 2**31,
) -> np.ndarray:
    """Read a label-mask image (PNG or TIFF, pyramidal or flat) as a mask of 0 unannotated, 1 normal, 2 tumor.

    Camelyon16 masks mark tumor with 255 (evaluation masks) or 1 (ASAP-converted masks); both are tumor by
    default. Pixel values in neither ``tumor_values`` nor ``normal_values`` become 0. Multi-channel masks must
    have equal channels (the first is used).

    Args:
        path: ``.png`` (read with PIL) or ``.tif``/``.tiff`` (read with tifffile) label image.
        level: pyramid level for TIFF (0 = full resolution); must be 0 for other formats.
        tumor_values: pixel values meaning tumor.
        normal_values: pixel values meaning normal tissue.
        max_pixels: refuse a level larger than this many pixels (a Camelyon16 level 0 is ~2e10); ``None``
            disables the check.

    Returns:
        ``uint8`` array ``(rows, cols)`` with values :data:`MASK_UNANNOTATED`, :data:`MASK_NORMAL`,
        :data:`MASK_TUMOR`.

    Raises:
        AnnotationError: the file is missing or unreadable, the level does not exist or is too large, or the
            image is a colour image.
        ConfigError: a value is both in ``tumor_values`` and ``normal_values``.
    """
    path = Path(path)
    both = set(int(v) for v in tumor_values) & set(int(v) for v in normal_values)
    if both:
        raise ConfigError(f"`tumor_values` and `normal_values` overlap in {sorted(both)}.")
    if not path.is_file():
        raise AnnotationError(path, "label mask not found")
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = _read_tiff_level(path, level, max_pixels)
    else:
        if level != 0:
            raise AnnotationError(path, f"`level={level}` asked for, but only TIFF masks have pyramid levels")
        arr = _read_pil(path, max_pixels)
    if arr.ndim == 3:
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] in (2, 3, 4) and all(np.array_equal(arr[..., 0], arr[..., k])
                                                for k in range(1, min(arr.shape[-1], 3))):
            arr = arr[..., 0]
        else:
            raise AnnotationError(path, f"label mask has shape {arr.shape} with differing channels; expected a "
                                        "single-channel image of label values")
    if arr.ndim != 2:
        raise AnnotationError(path, f"label mask must be a 2-D image, got shape {arr.shape}")
    out = np.zeros(arr.shape, dtype=np.uint8)
    if normal_values:
        out[np.isin(arr, np.asarray(list(normal_values)))] = MASK_NORMAL
    if tumor_values:
        out[np.isin(arr, np.asarray(list(tumor_values)))] = MASK_TUMOR
    return out


def _check_pixels(path: Path, shape: Sequence[int], max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and int(np.prod(shape[:2])) > max_pixels:
        raise AnnotationError(path, f"{what} has shape {tuple(shape)}, more than max_pixels={max_pixels}; read a "
                                    "coarser pyramid level (`level`) or raise `max_pixels`")


def _tiff_pyramid(tif) -> list:
    """The levels of a TIFF's first image, finest first (tifffile series or levels)."""
    levels = list(tif.series[0].levels)
    if len(levels) == 1 and len(tif.series) > 1:
        # pyramids written as one page per level appear as several series of decreasing size
        levels = [s for s in tif.series if s.ndim == levels[0].ndim and
                  all(a <= b for a, b in zip(s.shape, levels[0].shape))]
    return levels


def label_mask_level_shapes(path: str | os.PathLike) -> list[tuple[int, int]]:
    """``(rows, cols)`` of each level of a label-mask image, finest first (one level for PNG).

    Raises:
        AnnotationError: the file is missing or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "label mask not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise AnnotationError(path, "TIFF has no image series")
                return [(int(s.shape[0]), int(s.shape[1])) for s in _tiff_pyramid(tif)]
        from PIL import Image

        with Image.open(path) as im:
            return [(int(im.height), int(im.width))]
    except AnnotationError:
        raise
    except Exception as e:  # tifffile and PIL raise many types for corrupt files
        raise AnnotationError(path, f"label mask could not be read ({type(e).__name__}: {e})") from None


def label_mask_level_for(path: str | os.PathLike, slide_width: int, max_downsample: float) -> int:
    """The coarsest level of a label mask whose downsample from the slide (slide width over level width) does not
    exceed ``max_downsample``; level 0 when even that is coarser.

    Camelyon16 masks are pyramids of the slide's size (level 0 about 10^10 pixels): reading the level that
    matches the patch grid keeps their labels exact at cell resolution without holding level 0.
    """
    shapes = label_mask_level_shapes(path)
    ok = [i for i, (_, cols) in enumerate(shapes) if slide_width / cols <= float(max_downsample) * 1.001]
    return max(ok) if ok else 0


def _read_tiff_level(path: Path, level: int, max_pixels: int | None) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise AnnotationError(path, "TIFF has no image series")
            levels = _tiff_pyramid(tif)
            if not 0 <= level < len(levels):
                raise AnnotationError(path, f"`level={level}` does not exist; the mask has {len(levels)} level(s) "
                                            f"{[tuple(s.shape) for s in levels]}")
            _check_pixels(path, levels[level].shape, max_pixels, f"level {level}")
            return np.asarray(levels[level].asarray())
    except AnnotationError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise AnnotationError(path, f"label mask TIFF could not be read ({type(e).__name__}: {e})") from None


def _read_pil(path: Path, max_pixels: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            _check_pixels(path, (im.height, im.width), max_pixels, "image")
            if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                return np.asarray(im)
            return np.asarray(im.convert("RGB"))
    except AnnotationError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise AnnotationError(path, f"label mask image could not be read ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------
# rasterisation


def _shoelace(ring: np.ndarray) -> float:
    if len(ring) < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _clip_ring(ring: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a ring to ``[0, width] x [0, height]`` (exact for the area of any simple ring)."""
    pts = np.asarray(ring, dtype=np.float64)
    for axis, bound, keep_below in ((0, 0.0, False), (0, float(width), True), (1, 0.0, False),
                                    (1, float(height), True)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] <= bound if keep_below else pts[:, axis] >= bound
        nxt = np.roll(pts, -1, axis=0)
        nxt_inside = np.roll(inside, -1)
        out = []
        for p, q, pin, qin in zip(pts, nxt, inside, nxt_inside):
            if pin:
                out.append(p)
            if pin != qin:
                t = (bound - p[axis]) / (q[axis] - p[axis])
                out.append(p + t * (q - p))
        pts = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return pts


def check_annotation_extent(
    polygons: Sequence[AnnotationPolygon],
    slide_size: Sequence[float],
    max_outside_fraction: float = 1.0,
    clip: bool = False,
    path_for_errors: str | os.PathLike | None = None,
) -> tuple[list[AnnotationPolygon], list[str]]:
    """Check that a slide's annotations lie on the slide (an annotation in another coordinate frame, e.g. level-0
    coordinates of a larger slide or of another level, would otherwise turn a tumor slide into all-normal data).

    The annotated area is the area of the tumor, normal and exclusion polygons (``OTHER`` ones are ignored
    anyway); the part outside ``[0, width] x [0, height]`` is measured exactly by clipping.

    Args:
        polygons: the polygons, in level-0 pixel coordinates.
        slide_size: the slide's level-0 ``(width, height)``.
        max_outside_fraction: most fraction of the annotated area that may lie outside. The default 1.0 fails
            only when none of it lies on the slide; 0.5 fails when more than half lies outside.
        clip: never fail: polygons are clipped to the slide (those wholly outside dropped) and a warning says how
            much was cut.
        path_for_errors: the annotation file, named in the error and the warnings.

    Returns:
        ``(polygons, warnings)``: the polygons (clipped when ``clip``, else as given) and warning texts for a
        summary (empty when everything lies on the slide).

    Raises:
        AnnotationError: more than ``max_outside_fraction`` of the annotated area lies outside the slide (and
            ``clip`` is false); the message names the file, the fraction and the polygons' extent.
        ConfigError: ``max_outside_fraction`` is not in [0, 1] or ``slide_size`` is not two positive numbers.
    """
    if not (isinstance(max_outside_fraction, (int, float)) and 0.0 <= float(max_outside_fraction) <= 1.0):
        raise ConfigError(f"`max_outside_fraction` must be in [0, 1], got {max_outside_fraction!r}.")
    if len(slide_size) != 2 or not all(math.isfinite(float(v)) and float(v) > 0 for v in slide_size):
        raise ConfigError(f"`slide_size` must be (width, height) > 0, got {slide_size!r}.")
    width, height = float(slide_size[0]), float(slide_size[1])
    source = str(path_for_errors) if path_for_errors is not None else "<polygons>"
    polygons = list(polygons)
    used = [p for p in polygons if p.label != AnnotationLabel.OTHER]
    total = inside = 0.0
    clipped: dict[int, AnnotationPolygon | None] = {}
    for i, poly in enumerate(polygons):
        if poly.label == AnnotationLabel.OTHER:
            continue
        ext = _clip_ring(poly.exterior, width, height)
        holes = [_clip_ring(h, width, height) for h in poly.holes]
        area_in = max(_shoelace(ext) - sum(_shoelace(h) for h in holes), 0.0)
        total += poly.area
        inside += min(area_in, poly.area)
        if len(ext) >= 3 and area_in > 0:
            clipped[i] = AnnotationPolygon(ext, [h for h in holes if len(h) >= 3], poly.label, poly.name, poly.group)
        else:
            clipped[i] = None
    if not used or total <= 0:
        return polygons, []
    outside = max(total - inside, 0.0)
    fraction = outside / total
    if fraction <= 1e-9:
        return polygons, []
    pts = np.concatenate([p.exterior for p in used])
    extent = (f"the polygons span x {pts[:, 0].min():.0f}..{pts[:, 0].max():.0f}, y {pts[:, 1].min():.0f}.."
              f"{pts[:, 1].max():.0f}; the slide is {width:.0f} x {height:.0f} px")
    n_out = sum(1 for i in clipped if clipped[i] is None)
    what = f"{fraction:.1%} of the annotated area ({n_out} of {len(used)} polygon(s) wholly) lies outside the slide"
    too_much = inside <= 0 or fraction > float(max_outside_fraction)
    if too_much and not clip:
        hint = ("none of it lies on the slide: is it another slide's annotation, or in another level's or "
                "another scanner's coordinates?") if inside <= 0 else f"over the allowed {max_outside_fraction:.0%}"
        allow = "clip_annotations" if inside <= 0 else "clip_annotations or a larger annotation_max_outside_fraction"
        raise AnnotationError(source, f"{what}; {hint} ({extent}); allow it with {allow}")
    if clip:
        kept = [p if i not in clipped else clipped[i] for i, p in enumerate(polygons)
                if i not in clipped or clipped[i] is not None]
        return kept, [f"{source}: {what}; clipped to the slide ({extent})"]
    return polygons, [f"{source}: {what}; the part outside is ignored ({extent})"]


def annotation_warnings(polygons: Sequence[AnnotationPolygon], path: str | os.PathLike | None = None,
                        fmt_hint: str = "") -> list[str]:
    """Warnings worth a line in a run's summary about what an annotation file contributes: classes that are
    ignored (not tumor, normal or exclusion; map them with ``class_map``) and files without any polygon.

    Args:
        polygons: the polygons read from the file.
        path: the file, named in the warnings.
        fmt_hint: how an empty file looks in its format (e.g. ``"an empty FeatureCollection"``), for the text.

    Returns:
        Warning texts (empty when every polygon is used).
    """
    source = str(path) if path is not None else "<polygons>"
    if not polygons:
        what = fmt_hint or "e.g. an empty FeatureCollection"
        return [f"{source}: no annotation polygons ({what}): the slide is treated as having no tumor"]
    ignored: dict[str, int] = {}
    for p in polygons:
        if p.label == AnnotationLabel.OTHER:
            ignored[p.group or "<unclassified>"] = ignored.get(p.group or "<unclassified>", 0) + 1
    if not ignored:
        return []
    n = sum(ignored.values())
    classes = ", ".join(f"{k!r} ({v})" for k, v in sorted(ignored.items()))
    every = " - every polygon of the file, so it contributes no label" if n == len(polygons) else ""
    return [f"{source}: {n} of {len(polygons)} polygon(s) ignored{every}: class(es) {classes} are not tumor, "
            "normal or exclusion (give them a label with class_map)"]


def polygons_area(polygons: Iterable[AnnotationPolygon]) -> dict[AnnotationLabel, float]:
    """Summed level-0 area (px^2) per label: shoelace exterior minus holes; overlaps are counted twice.

    Args:
        polygons: the polygons.

    Returns:
        ``{label: area}`` with every :class:`AnnotationLabel` as a key (0.0 where absent).
    """
    out = {lab: 0.0 for lab in AnnotationLabel}
    for p in polygons:
        out[p.label] += p.area
    return out


def _ring_spans(xs: np.ndarray, ys: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Even-odd scanline fill of one ring in mask coordinates (pixel ``(r, c)`` centre at ``(c, r)``).

    Returns ``(row, start, end)`` of half-open column spans, clipped to the mask. An edge counts for row ``r``
    when ``min(y0, y1) <= r < max(y0, y1)``; pixel ``c`` is in a span ``[xa, xb)`` when ``xa <= c < xb``.
    """
    x0, y0 = xs, ys
    x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
    keep = y0 != y1
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    r_lo = np.maximum(np.ceil(np.minimum(y0, y1)), 0)
    r_hi = np.minimum(np.ceil(np.maximum(y0, y1)), rows)
    n = np.maximum(r_hi - r_lo, 0).astype(np.int64)
    total = int(n.sum())
    empty = np.zeros(0, dtype=np.int64)
    if total == 0:
        return empty, empty, empty
    edge = np.repeat(np.arange(len(n)), n)
    first = np.cumsum(n) - n
    r = r_lo[edge] + (np.arange(total) - first[edge])
    x = x0[edge] + (r - y0[edge]) * ((x1 - x0) / (y1 - y0))[edge]
    order = np.lexsort((x, r))
    r, x = r[order], x[order]
    row = r[0::2].astype(np.int64)
    start = np.clip(np.ceil(x[0::2]), 0, cols).astype(np.int64)
    end = np.clip(np.ceil(x[1::2]), 0, cols).astype(np.int64)
    nonempty = end > start
    return row[nonempty], start[nonempty], end[nonempty]


def _paint(row: np.ndarray, start: np.ndarray, end: np.ndarray, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Boolean ``(h, w)`` window at ``(r0, c0)`` with the spans that fall inside it set."""
    inside = (row >= r0) & (row < r0 + h)
    row, start, end = row[inside] - r0, np.clip(start[inside] - c0, 0, w), np.clip(end[inside] - c0, 0, w)
    diff = np.zeros((h, w + 1), dtype=np.int8)  # even-odd spans of one ring are disjoint: running sum is 0 or 1
    np.add.at(diff, (row, start), 1)
    np.add.at(diff, (row, end), -1)
    return np.cumsum(diff[:, :w], axis=1, dtype=np.int8) > 0


def _fill_polygon(target: np.ndarray, poly: AnnotationPolygon, downsample: float) -> None:
    """OR the polygon (exterior minus holes) into the boolean ``target`` in place."""
    rows, cols = target.shape
    ext = poly.exterior / downsample - 0.5
    row, start, end = _ring_spans(ext[:, 0], ext[:, 1], rows, cols)
    if len(row) == 0:
        return
    r0, c0 = int(row.min()), int(start.min())
    h, w = int(row.max()) - r0 + 1, int(end.max()) - c0
    local = _paint(row, start, end, r0, c0, h, w)
    for hole in poly.holes:
        hole = hole / downsample - 0.5
        hrow, hstart, hend = _ring_spans(hole[:, 0], hole[:, 1], rows, cols)
        if len(hrow):
            local &= ~_paint(hrow, hstart, hend, r0, c0, h, w)
    target[r0:r0 + h, c0:c0 + w] |= local


def rasterize_annotations(
    polygons: Iterable[AnnotationPolygon],
    shape: tuple[int, int],
    downsample: float,
    path_for_errors: str | os.PathLike | None = None,
) -> np.ndarray:
    """Rasterise polygons into a label mask: 0 unannotated, 1 normal, 2 tumor.

    Semantics: tumor = union of tumor polygons (each minus its holes) minus the union of exclusion polygons;
    normal = union of normal polygons (minus holes) that is not tumor; exclusion regions stay 0 unless a normal
    polygon covers them; ``OTHER`` polygons are ignored.

    Convention: pixel ``(r, c)`` covers level-0 ``[c*d, (c+1)*d) x [r*d, (r+1)*d)`` for ``d = downsample`` and
    is inside a polygon when its centre ``((c + 0.5) d, (r + 0.5) d)`` is (even-odd rule; a centre exactly on an
    edge counts when the edge is its left or top boundary, so abutting polygons share no pixel). This is the test
    of :func:`skimage.draw.polygon` on the vertices ``(x / d - 0.5, y / d - 0.5)`` (which counts every centre on
    an edge as inside), done here as a vectorised
    scanline fill whose cost grows with the polygon's perimeter and bounding box rather than with their
    product, so a whole-slide Camelyon16 outline at downsample 32 takes milliseconds. Parts outside the mask
    are clipped, with one :class:`AnnotationWarning` saying how many vertices lay outside.

    Args:
        polygons: polygons in level-0 pixel coordinates.
        shape: ``(rows, cols)`` of the mask.
        downsample: level-0 pixels per mask pixel (> 0).
        path_for_errors: the annotation file, named in warnings and errors.

    Returns:
        ``uint8`` mask of ``shape``.

    Raises:
        ConfigError: ``shape`` or ``downsample`` is invalid.
        AnnotationError: a polygon has non-finite coordinates.
    """
    if len(shape) != 2 or any(int(s) != s or s <= 0 for s in shape):
        raise ConfigError(f"`shape` must be (rows, cols) of positive integers, got {shape!r}.")
    if not (isinstance(downsample, (int, float, np.number)) and math.isfinite(downsample) and downsample > 0):
        raise ConfigError(f"`downsample` must be a positive number, got {downsample!r}.")
    rows, cols = int(shape[0]), int(shape[1])
    source = str(path_for_errors) if path_for_errors is not None else "<polygons>"
    masks = {lab: np.zeros((rows, cols), dtype=bool) for lab in (AnnotationLabel.TUMOR, AnnotationLabel.NORMAL,
                                                                 AnnotationLabel.EXCLUDE)}
    width, height = cols * downsample, rows * downsample
    n_out = n_total = n_poly_out = 0
    for i, poly in enumerate(polygons):
        if poly.label not in masks:
            continue
        rings = [poly.exterior, *poly.holes]
        if not all(np.isfinite(r).all() for r in rings):
            raise AnnotationError(source, f"polygon {i} ({poly.name!r}) has non-finite coordinates")
        outside = sum(int(((r[:, 0] < 0) | (r[:, 0] > width) | (r[:, 1] < 0) | (r[:, 1] > height)).sum())
                      for r in rings)
        n_out += outside
        n_total += sum(len(r) for r in rings)
        n_poly_out += outside > 0
        if len(poly.exterior) >= 3:
            _fill_polygon(masks[poly.label], poly, float(downsample))
    if n_out:
        warnings.warn(f"{source}: {n_out} of {n_total} vertices ({n_poly_out} polygon(s)) lie outside the "
                      f"{width:g} x {height:g} level-0 extent of the {rows} x {cols} mask at downsample "
                      f"{downsample:g}; the polygons were clipped", AnnotationWarning, stacklevel=2)
    tumor = masks[AnnotationLabel.TUMOR] & ~masks[AnnotationLabel.EXCLUDE]
    out = np.zeros((rows, cols), dtype=np.uint8)
    out[masks[AnnotationLabel.NORMAL]] = MASK_NORMAL
    out[tumor] = MASK_TUMOR
    return out


# ----------------------------------------------------------------------------------------------------------------
# writing

# ASAP/Camelyon16 groups used when writing: tumor -> _0, exclude -> _2, normal -> "normal"
_ASAP_GROUP = {AnnotationLabel.TUMOR: "_0", AnnotationLabel.EXCLUDE: "_2", AnnotationLabel.NORMAL: "normal",
               AnnotationLabel.OTHER: "other"}
_ASAP_COLOR = {"_0": "#F4FA58", "_1": "#F4FA58", "_2": "#64FE2E", "normal": "#00A0FF", "other": "#AAAAAA"}
_ASAP_KEEP = {("_0", AnnotationLabel.TUMOR), ("_1", AnnotationLabel.TUMOR), ("_2", AnnotationLabel.EXCLUDE)}


def write_asap_xml(path: str | os.PathLike, polygons: list[AnnotationPolygon]) -> Path:
    """Write polygons in the ASAP XML layout Camelyon16 ships (groups ``_0`` tumor, ``_2`` exclusion).

    ASAP has no holes: each hole is written as its own polygon in the exclusion group ``_2``, which is how
    Camelyon16 encodes normal tissue inside a tumor outline (so holes of normal polygons do not survive a round
    trip). A polygon keeps its Camelyon16 group (``_0``/``_1``/``_2``) when that agrees with its label; otherwise
    the group follows the label (tumor ``_0``, exclude ``_2``, normal ``normal``, other ``other``).

    Args:
        path: destination ``.xml`` (written atomically).
        polygons: polygons to write.

    Returns:
        The path written.
    """
    rings: list[tuple[str, str, np.ndarray]] = []
    for i, poly in enumerate(polygons):
        group = poly.group if (poly.group, poly.label) in _ASAP_KEEP else _ASAP_GROUP[poly.label]
        rings.append((poly.name or f"Annotation {i}", group, poly.exterior))
        for j, hole in enumerate(poly.holes):
            rings.append((f"{poly.name or f'Annotation {i}'} hole {j}", "_2", hole))
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for name, group, ring in rings:
        lines.append(f"\t\t<Annotation Name={quoteattr(name)} Type=\"Polygon\" PartOfGroup={quoteattr(group)} "
                     f"Color=\"{_ASAP_COLOR[group]}\">")
        lines.append("\t\t\t<Coordinates>")
        for k, (x, y) in enumerate(ring):
            lines.append(f'\t\t\t\t<Coordinate Order="{k}" X="{x:.4f}" Y="{y:.4f}" />')
        lines.append("\t\t\t</Coordinates>")
        lines.append("\t\t</Annotation>")
    lines.append("\t</Annotations>")
    lines.append("\t<AnnotationGroups>")
    for group in sorted({g for _, g, _ in rings}):
        lines.append(f'\t\t<Group Name={quoteattr(group)} PartOfGroup="None" Color="{_ASAP_COLOR[group]}">')
        lines.append("\t\t\t<Attributes />")
        lines.append("\t\t</Group>")
    lines.append("\t</AnnotationGroups>")
    lines.append("</ASAP_Annotations>")
    return write_text_atomic(path, "\n".join(lines) + "\n")


_QUPATH_CLASS = {AnnotationLabel.TUMOR: ("Tumor", -3670016), AnnotationLabel.NORMAL: ("Normal", -16711936),
                 AnnotationLabel.EXCLUDE: ("Ignore*", -3355444), AnnotationLabel.OTHER: ("Other", -8355712)}


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = [[float(x), float(y)] for x, y in ring]
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def write_qupath_geojson(
    path: str | os.PathLike, polygons: list[AnnotationPolygon], object_type: str = "annotation",
    properties: list[dict] | None = None,
) -> Path:
    """Write polygons as a QuPath-compatible GeoJSON ``FeatureCollection`` (rings closed, holes kept).

    Args:
        path: destination ``.geojson`` (written atomically).
        polygons: polygons to write.
        object_type: QuPath ``objectType`` (``annotation`` or ``detection``).
        properties: optional extra properties per polygon (e.g. area, mean probability), merged into each
            feature's ``properties``.

    Returns:
        The path written.

    Raises:
        ConfigError: ``properties`` does not have one entry per polygon.
    """
    polygons = list(polygons)
    if properties is not None and len(properties) != len(polygons):
        raise ConfigError(f"`properties` must have one dict per polygon ({len(polygons)}), got {len(properties)}.")
    features = []
    for i, poly in enumerate(polygons):
        class_name, color = _QUPATH_CLASS[poly.label]
        props = {"objectType": object_type, "classification": {"name": class_name, "color": color}}
        if poly.name:
            props["name"] = poly.name
        if properties is not None:
            props.update(properties[i])
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_closed(poly.exterior)] + [_closed(h) for h in poly.holes]},
            "properties": props,
        })
    return write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
