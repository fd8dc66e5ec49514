"""Tests of annotation reading (ASAP, GeoJSON, ImageScope, NCRF JSON, label masks), writing and rasterisation."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import polygon as sk_polygon
from skimage.measure import points_in_poly

from monai_wsi_ext.io.annotations import (
    AnnotationLabel,
    AnnotationPolygon,
    AnnotationWarning,
    map_class_name,
    polygons_area,
    rasterize_annotations,
    read_annotations,
    read_label_mask,
    write_asap_xml,
    write_qupath_geojson,
)
from monai_wsi_ext.errors import AnnotationError, ConfigError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "annotations"
CAMELYON = DATA / "camelyon16"
OTHER = DATA / "other"
needs_data = pytest.mark.skipif(not CAMELYON.is_dir(), reason=f"real annotations not found at {DATA}")

T, N, X, O = AnnotationLabel.TUMOR, AnnotationLabel.NORMAL, AnnotationLabel.EXCLUDE, AnnotationLabel.OTHER

# polygons per label, counted by hand from the files (and re-counted independently in the test)
CAMELYON_COUNTS = {
    "Tumor_081": {T: 1, X: 0, N: 0},
    "Tumor_093": {T: 1, X: 0, N: 0},
    "Tumor_107": {T: 2, X: 3, N: 0},
    "Normal_141": {T: 0, X: 0, N: 8},  # only '_2' / 'negative' outlines: normal tissue of a normal slide
}


def _counts(polys):
    return {lab: sum(p.label == lab for p in polys) for lab in (T, X, N)}


def _regex_counts_xml(path: Path) -> dict:
    groups = re.findall(r'<Annotation\s[^>]*PartOfGroup="([^"]*)"', path.read_text())
    n_tumor = sum(g in ("_0", "_1") for g in groups)
    n_two = sum(g == "_2" for g in groups)
    assert len(groups) == n_tumor + n_two, f"unexpected groups in {path}: {set(groups)}"
    return {T: n_tumor, X: n_two if n_tumor else 0, N: 0 if n_tumor else n_two}


def _json_counts(path: Path) -> dict:
    doc = json.loads(path.read_text())
    pos, neg = len(doc.get("positive", [])), len(doc.get("negative", []))
    return {T: pos, X: neg if pos else 0, N: 0 if pos else neg}


def _square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


# ------------------------------------------------------------------------------------------------------------
# Camelyon16 ASAP XML and NCRF JSON


@needs_data
@pytest.mark.parametrize("slide", sorted(CAMELYON_COUNTS))
def test_camelyon_xml_and_json_agree(slide):
    xml = read_annotations(CAMELYON / f"{slide}.xml")
    js = read_annotations(CAMELYON / f"{slide}.json")
    assert _counts(xml) == CAMELYON_COUNTS[slide]
    assert _counts(js) == CAMELYON_COUNTS[slide]
    assert _regex_counts_xml(CAMELYON / f"{slide}.xml") == CAMELYON_COUNTS[slide]
    assert _json_counts(CAMELYON / f"{slide}.json") == CAMELYON_COUNTS[slide]
    # the same polygons, vertex for vertex, in the same order
    assert len(xml) == len(js)
    for a, b in zip(xml, js):
        assert a.label == b.label
        np.testing.assert_allclose(a.exterior, b.exterior)
    assert all(len(p.exterior) >= 3 and not p.holes for p in xml)
    assert {p.group for p in xml} <= {"_0", "_1", "_2"}


@needs_data
def test_camelyon_explicit_formats_and_mismatch():
    assert len(read_annotations(CAMELYON / "Tumor_107.xml", fmt="asap")) == 5
    assert len(read_annotations(CAMELYON / "Tumor_107.json", fmt="ncrf_json")) == 5
    with pytest.raises(AnnotationError, match="Tumor_107.xml.*'imagescope'.*'asap'"):
        read_annotations(CAMELYON / "Tumor_107.xml", fmt="imagescope")
    with pytest.raises(AnnotationError, match="'geojson'.*'ncrf_json'"):
        read_annotations(CAMELYON / "Tumor_107.json", fmt="geojson")
    with pytest.raises(ConfigError, match="`fmt`"):
        read_annotations(CAMELYON / "Tumor_107.json", fmt="svg")


@needs_data
def test_tumor_107_exclusions_inside_tumor_reduce_area():
    polys = read_annotations(CAMELYON / "Tumor_107.xml")
    tumors = [p for p in polys if p.label == T]
    excludes = [p for p in polys if p.label == X]
    assert len(excludes) == 3
    for ex in excludes:  # most of each exclusion outline lies inside one tumor outline
        inside = max(points_in_poly(ex.exterior, t.exterior).mean() for t in tumors)
        assert inside > 0.5, inside
    ds = 32
    xmax, ymax = np.max([p.exterior.max(0) for p in polys], axis=0)
    shape = (int(ymax // ds) + 4, int(xmax // ds) + 4)
    full = rasterize_annotations(polys, shape, ds)
    exterior_only = rasterize_annotations(tumors, shape, ds)
    n_full, n_ext = int((full == 2).sum()), int((exterior_only == 2).sum())
    assert set(np.unique(full)) == {0, 2}
    assert 0 < n_full < n_ext
    # the raster areas agree with the shoelace areas within 3 %
    areas = polygons_area(tumors)
    assert abs(n_ext * ds * ds - areas[T]) / areas[T] < 0.03
    # removed pixels: those of the exclusions that overlap tumor
    ex_mask = rasterize_annotations([AnnotationPolygon(p.exterior, label=T) for p in excludes], shape, ds)
    assert n_ext - n_full == int(((ex_mask == 2) & (exterior_only == 2)).sum())


@needs_data
def test_normal_141_has_no_tumor():
    for ext in ("xml", "json"):
        polys = read_annotations(CAMELYON / f"Normal_141.{ext}")
        assert not any(p.label == T for p in polys)
        xmax, ymax = np.max([p.exterior.max(0) for p in polys], axis=0)
        mask = rasterize_annotations(polys, (int(ymax // 64) + 2, int(xmax // 64) + 2), 64)
        counts = np.bincount(mask.ravel(), minlength=3)
        assert counts[2] == 0 and counts[1] > 1000


@needs_data
def test_rasterize_is_fast_on_a_whole_slide_extent():
    polys = read_annotations(CAMELYON / "Normal_141.json") + read_annotations(CAMELYON / "Tumor_107.json")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        mask = rasterize_annotations(polys, (200_000 // 32, 130_000 // 32), 32)
    elapsed = time.perf_counter() - start
    assert mask.shape == (6250, 4062)
    assert elapsed < 3.0, f"rasterisation took {elapsed:.2f} s"
    assert (mask == 2).sum() > 0 and (mask == 1).sum() > 0


@needs_data
@pytest.mark.parametrize("downsample", [1.0, 3.7, 16.0])
def test_rasterize_matches_skimage_polygon(downsample):
    """Same pixels as skimage.draw.polygon on (x/d - 0.5, y/d - 0.5), except centres exactly on an edge."""
    poly = read_annotations(CAMELYON / "Tumor_081.xml")[0]
    v = poly.exterior - poly.exterior.min(0) + 10 * downsample
    shape = tuple(int(s) for s in (v.max(0)[::-1] / downsample + 10))
    ref = np.zeros(shape, dtype=np.uint8)
    rr, cc = sk_polygon(v[:, 1] / downsample - 0.5, v[:, 0] / downsample - 0.5, shape)
    ref[rr, cc] = 2
    ours = rasterize_annotations([AnnotationPolygon(v, label=T)], shape, downsample)
    diff = ref != ours
    assert ref.astype(bool).sum() > 100
    # each differing pixel centre lies on an edge (within float error)
    r, c = np.nonzero(diff)
    assert len(r) <= max(0.001 * ref.astype(bool).sum(), 25)
    if len(r):
        ring = v / downsample - 0.5
        a, b = ring, np.roll(ring, -1, axis=0)
        pts = np.stack([c, r], 1).astype(float)
        dist = np.full(len(pts), np.inf)
        for p0, p1 in zip(a, b):
            seg = p1 - p0
            t = np.clip(((pts - p0) @ seg) / (seg @ seg), 0, 1)
            dist = np.minimum(dist, np.hypot(*(pts - (p0 + t[:, None] * seg)).T))
        assert dist.max() < 1e-6


# ------------------------------------------------------------------------------------------------------------
# QuPath GeoJSON and ImageScope


@needs_data
def test_qupath05_geojson():
    polys = read_annotations(OTHER / "qupath05.geojson")
    assert [p.name for p in polys] == ["UT", "I", "I"]
    assert [len(p.exterior) for p in polys] == [163, 115, 118]  # closing vertex dropped
    assert all(p.label == O and not p.holes for p in polys)  # names UT / I are unknown classes
    mapped = read_annotations(OTHER / "qupath05.geojson", class_map={"ut": "tumor", "I": N})
    assert [p.label for p in mapped] == [T, N, N]
    np.testing.assert_array_equal(mapped[0].exterior[0], [8909, 6277])


@needs_data
def test_holed_geojson_area():
    polys = read_annotations(OTHER / "holed.geojson", class_map={"": "tumor"})
    assert len(polys) == 1
    (p,) = polys
    assert p.label == T and len(p.exterior) == 4 and len(p.holes) == 1 and len(p.holes[0]) == 240
    ext_area = 3271.0 * 2728.0  # the exterior is the rectangle 10098..13369 x 16763..19491
    assert polygons_area(polys)[T] < ext_area
    expected = polygons_area(polys)[T]
    ds = 8
    mask = rasterize_annotations(polys, (19491 // ds + 8, 13369 // ds + 8), ds)
    raster_area = (mask == 2).sum() * ds * ds
    assert abs(raster_area - expected) / expected < 0.01
    assert (mask[17552 // ds + 20, 10985 // ds + 20:12435 // ds - 20] == 2).sum() < 180  # inside the hole mostly 0
    # without a class map the unclassified polygon is 'other' and is not drawn
    assert read_annotations(OTHER / "holed.geojson")[0].label == O


@needs_data
def test_imagescope_xml():
    path = OTHER / "imagescope_TCGA-EJ-5518-01Z-00-DX1.xml"
    text = path.read_text()
    n_regions = len(re.findall(r"<Region\s", text))
    polys = read_annotations(path)
    assert n_regions == 4 and len(polys) == 4
    assert [len(p.exterior) for p in polys] == [331, 1553, 572, 364]
    assert [p.group for p in polys] == ["CaP", "CaP", "", ""]
    assert all(p.label == O and not p.holes for p in polys)
    # shoelace areas equal the Area the file stores for each region
    file_areas = [float(a) for a in re.findall(r'<Region\s[^>]*\sArea="([^"]+)"', text)]
    np.testing.assert_allclose([p.area for p in polys], file_areas, atol=0.1)
    mapped = read_annotations(path, class_map={"CaP": "tumor"})
    assert [p.label for p in mapped] == [T, T, O, O]


def test_imagescope_negative_regions_become_holes_or_exclusions(tmp_path):
    path = tmp_path / "aperio.xml"
    path.write_text(
        '<Annotations MicronsPerPixel="0.25">'
        '<Annotation Id="1" Name="Tumor"><Attributes/><Regions>'
        '<Region Id="1" Type="0" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="100" Y="0"/>'
        '<Vertex X="100" Y="100"/><Vertex X="0" Y="100"/></Vertices></Region>'
        '<Region Id="2" Type="0" NegativeROA="1"><Vertices><Vertex X="20" Y="20"/><Vertex X="40" Y="20"/>'
        '<Vertex X="40" Y="40"/><Vertex X="20" Y="40"/></Vertices></Region>'
        '<Region Id="3" Type="0" NegativeROA="1"><Vertices><Vertex X="200" Y="200"/><Vertex X="220" Y="200"/>'
        '<Vertex X="220" Y="220"/></Vertices></Region>'
        '<Region Id="4" Type="2" NegativeROA="0"><Vertices><Vertex X="300" Y="300"/><Vertex X="340" Y="320"/>'
        '</Vertices></Region>'
        '<Region Id="5" Type="4" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="9" Y="9"/>'
        '</Vertices></Region>'
        "</Regions></Annotation>"
        '<Annotation Id="2" Name=""><Attributes><Attribute Name="Description" Value="Stroma"/></Attributes>'
        '<Regions><Region Id="1" Type="1" NegativeROA="0"><Vertices><Vertex X="500" Y="500"/>'
        '<Vertex X="600" Y="550"/></Vertices></Region></Regions></Annotation>'
        "</Annotations>"
    )
    with pytest.warns(AnnotationWarning, match="skipped 1 item"):
        polys = read_annotations(path)
    assert [p.label for p in polys] == [T, T, X, N]
    square, ellipse, excl, rect = polys
    assert len(square.holes) == 1 and square.area == 100 * 100 - 20 * 20
    assert len(ellipse.exterior) == 64 and abs(ellipse.area - np.pi * 20 * 10) < 0.01 * np.pi * 200
    assert excl.area == 200.0
    np.testing.assert_array_equal(rect.exterior, _square(500, 500, 600, 550))
    with pytest.raises(AnnotationError, match="Region 5.*strict"):
        read_annotations(path, strict=True)


# ------------------------------------------------------------------------------------------------------------
# broken, unsafe and odd files


def _asap(*coords: str, group: str = "_0") -> str:
    anns = "".join(f'<Annotation Name="a{i}" Type="Polygon" PartOfGroup="{group}"><Coordinates>{c}</Coordinates>'
                   "</Annotation>" for i, c in enumerate(coords))
    return f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{anns}</Annotations></ASAP_Annotations>'


@needs_data
def test_truncated_xml_raises(tmp_path):
    data = (CAMELYON / "Tumor_107.xml").read_bytes()
    for name, cut in (("cut_half.xml", data[: len(data) // 2]), ("cut_tail.xml", data[:-20])):
        (tmp_path / name).write_bytes(cut)
        with pytest.raises(AnnotationError, match=rf"{name}: malformed or truncated XML"):
            read_annotations(tmp_path / name)


@pytest.mark.timeout(30)
def test_billion_laughs_is_refused(tmp_path):
    entities = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    path = tmp_path / "bomb.xml"
    path.write_text(f'<?xml version="1.0"?>\n<!DOCTYPE lolz [{"".join(entities)}]>\n'
                    "<ASAP_Annotations><Annotations>&lol9;</Annotations></ASAP_Annotations>\n")
    with pytest.raises(AnnotationError, match=r"bomb.xml: unsafe XML refused \(EntitiesForbidden"):
        read_annotations(path)
    external = tmp_path / "external.xml"
    external.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                        "<ASAP_Annotations>&e;</ASAP_Annotations>")
    with pytest.raises(AnnotationError, match="unsafe XML"):
        read_annotations(external)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.json", '{"positive": [{"name": "a", "vertices": [[1, 2], [3, ', "malformed or truncated JSON"),
        ("bad.geojson", '{"type": "FeatureCollection", "features": [', "malformed or truncated JSON"),
        ("keys.json", '{"rois": []}', "unknown JSON annotation layout"),
        ("scalar.json", "[1, 2]", "feature 0 must be an object"),
        ("verts.json", '{"positive": [{"name": "a", "vertices": [[1, "x"], [3, 4], [5, 6]]}]}',
         r"non-numeric coordinate 'x'"),
        ("nan.json", '{"positive": [{"name": "a", "vertices": [[1, NaN], [3, 4], [5, 6]]}]}', "non-finite"),
        ("bool.geojson", '{"type": "Polygon", "coordinates": [[[0, 0], [1, true], [1, 1]]]}', "must be a number"),
        ("layout.xml", "<Slide><Region/></Slide>", r"unknown XML annotation layout: root tag <Slide>"),
        ("letters.xml", _asap('<Coordinate Order="0" X="1e3" Y="abc"/>'), "non-numeric coordinate 'abc'"),
        ("missing.xml", _asap('<Coordinate Order="0" X="1"/>'), "coordinate 0 Y: coordinate missing"),
        ("empty.json", "  \n", "annotation file is empty"),
        ("text.txt", "hello", "not an XML or JSON annotation file"),
    ],
)
def test_malformed_files_raise(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AnnotationError, match=match) as info:
        read_annotations(path)
    assert info.value.path == str(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(AnnotationError, match="nope.xml: annotation file not found"):
        read_annotations(tmp_path / "nope.xml")


def test_degenerate_polygons_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "degenerate.xml"
    two = '<Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="5" Y="5"/><Coordinate Order="2" X="1" Y="1"/>'
    shuffled = ('<Coordinate Order="2" X="10,5" Y="0"/><Coordinate Order="0" X="0" Y="0"/>'
                '<Coordinate Order="1" X="10" Y="10"/>')
    path.write_text(_asap(two, shuffled))
    with pytest.warns(AnnotationWarning, match="degenerate polygon with 2 vertices"):
        polys = read_annotations(path)
    assert len(polys) == 1
    # coordinates sorted by Order; a decimal comma is accepted
    np.testing.assert_array_equal(polys[0].exterior, [[0, 0], [10, 10], [10.5, 0]])
    with pytest.raises(AnnotationError, match="degenerate"):
        read_annotations(path, strict=True)


def test_asap_nested_groups_and_utf16(tmp_path):
    text = ('<?xml version="1.0" encoding="UTF-16"?><ASAP_Annotations><Annotations>'
            '<Annotation Name="m1" Type="Spline" PartOfGroup="lesion 1"><Coordinates>'
            '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="4" Y="0"/><Coordinate Order="2" X="4" Y="4"/>'
            '</Coordinates></Annotation>'
            '<Annotation Name="p" Type="Dot" PartOfGroup="None"><Coordinates><Coordinate Order="0" X="1" Y="1"/>'
            '</Coordinates></Annotation>'
            '<Annotation Name="u" Type="Polygon" PartOfGroup="None"><Coordinates>'
            '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="4" Y="0"/><Coordinate Order="2" X="4" Y="4"/>'
            '</Coordinates></Annotation></Annotations>'
            '<AnnotationGroups><Group Name="lesion 1" PartOfGroup="Metastases"/>'
            '<Group Name="Metastases" PartOfGroup="None"/></AnnotationGroups></ASAP_Annotations>')
    path = tmp_path / "nested.xml"
    path.write_bytes(text.encode("utf-16"))
    with pytest.warns(AnnotationWarning, match="type 'Dot'"):
        polys = read_annotations(path)
    assert [(p.name, p.label, p.group) for p in polys] == [("m1", T, "lesion 1"), ("u", O, "")]
    with pytest.warns(AnnotationWarning):
        assert read_annotations(path, class_map={"": "normal"})[1].label == N


def test_geojson_layouts_and_multipolygon(tmp_path):
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[2, 2], [4, 2], [4, 4], [2, 4], [2, 2]]
    feats = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square, hole], [square]]},
         "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"classification": "Stroma"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"classification": {"names": ["Tumor", "Positive"]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": {"label": "bg"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"classification": {"name": "Ignore*"}}},
    ]
    for layout, doc in (("list", feats), ("collection", {"type": "FeatureCollection", "features": feats})):
        path = tmp_path / f"{layout}.json"  # .json extension: sniffed as GeoJSON by content
        path.write_text(json.dumps(doc))
        with pytest.warns(AnnotationWarning, match="Point is not an area"):
            polys = read_annotations(path, class_map={"bg": "exclude"})
        assert [p.label for p in polys] == [T, T, N, T, X, X]
        assert [len(p.holes) for p in polys] == [1, 0, 0, 0, 0, 0]
        assert polys[0].area == 96.0 and polys[3].group == "Tumor: Positive"
    single = tmp_path / "single.geojson"
    single.write_text(json.dumps(feats[1]))
    assert [p.label for p in read_annotations(single)] == [N]


def test_map_class_name_defaults_and_overrides():
    assert map_class_name("Tumour") == T and map_class_name(" METASTASIS ") == T and map_class_name("_1") == T
    assert map_class_name("benign") == N and map_class_name("Ignore*") == X and map_class_name("ignore_me") == X
    assert map_class_name("lymphocytes") is None and map_class_name(None) is None
    assert map_class_name("Tumor", {"tumor": "other"}) == O
    with pytest.raises(ConfigError, match=r"class_map\['x'\]"):
        map_class_name("x", {"x": "cancer"})


# ------------------------------------------------------------------------------------------------------------
# writers: round trips


def _polys():
    return [
        AnnotationPolygon(_square(100, 100, 500, 400), [_square(200, 200, 250, 260), _square(300, 150, 350, 170)],
                          T, "big tumor"),
        AnnotationPolygon(np.array([[600.5, 600.25], [900, 620], [750, 880]]), [], N, "normal <&> \"one\""),
        AnnotationPolygon(_square(40, 40, 60, 60), [], X, "excl"),
    ]


def test_geojson_round_trip(tmp_path):
    polys = _polys()
    path = write_qupath_geojson(tmp_path / "out.geojson", polys, properties=[{"score": i} for i in range(3)])
    back = read_annotations(path)
    assert len(back) == 3
    for a, b in zip(polys, back):
        assert (a.label, a.name) == (b.label, b.name)
        np.testing.assert_array_equal(a.exterior, b.exterior)
        assert len(a.holes) == len(b.holes)
        for ha, hb in zip(a.holes, b.holes):
            np.testing.assert_array_equal(ha, hb)
    assert json.loads(path.read_text())["features"][0]["properties"]["score"] == 0
    with pytest.raises(ConfigError, match="one dict per polygon"):
        write_qupath_geojson(tmp_path / "bad.geojson", polys, properties=[{}])


def test_asap_round_trip_holes_become_exclusions(tmp_path):
    polys = _polys()
    back = read_annotations(write_asap_xml(tmp_path / "out.xml", polys))
    assert [p.label for p in back] == [T, X, X, N, X]
    assert [p.group for p in back] == ["_0", "_2", "_2", "normal", "_2"]
    assert back[3].name == 'normal <&> "one"'
    expected = [polys[0].exterior, *polys[0].holes, polys[1].exterior, polys[2].exterior]
    for ring, p in zip(expected, back):
        np.testing.assert_allclose(ring, p.exterior, atol=1e-4)
        assert not p.holes
    # the same label mask either way
    for ds in (1, 4):
        mask = rasterize_annotations(polys, (1000 // ds, 1000 // ds), ds)
        np.testing.assert_array_equal(mask, rasterize_annotations(back, (1000 // ds, 1000 // ds), ds))
        assert set(np.unique(mask)) == {0, 1, 2}


@needs_data
def test_asap_round_trip_of_camelyon_file(tmp_path):
    for slide in ("Tumor_107", "Normal_141"):
        polys = read_annotations(CAMELYON / f"{slide}.xml")
        back = read_annotations(write_asap_xml(tmp_path / f"{slide}.xml", polys))
        assert _counts(back) == CAMELYON_COUNTS[slide]
        for a, b in zip(polys, back):
            np.testing.assert_allclose(a.exterior, b.exterior)


# ------------------------------------------------------------------------------------------------------------
# rasterisation and areas on hand-computed shapes


def test_rasterize_square_with_hole_by_hand():
    poly = AnnotationPolygon(_square(0, 0, 8, 8), [_square(2, 2, 6, 6)], T)
    mask = rasterize_annotations([poly], (10, 10), 1)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:8, 0:8] = 2
    expected[2:6, 2:6] = 0
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.uint8 and (mask == 2).sum() == 48
    assert polygons_area([poly]) == {T: 48.0, N: 0.0, X: 0.0, O: 0.0}
    # downsample 2: pixel centres at level-0 1, 3, 5, 7, ...
    mask2 = rasterize_annotations([poly], (5, 5), 2)
    expected2 = np.zeros((5, 5), np.uint8)
    expected2[0:4, 0:4] = 2
    expected2[1:3, 1:3] = 0
    np.testing.assert_array_equal(mask2, expected2)
    # downsample 4: centres at 2 and 6 lie on the hole's edges; half-open rule: 2 is in the hole, 6 is not
    mask4 = rasterize_annotations([poly], (3, 3), 4.0)
    np.testing.assert_array_equal(mask4, [[0, 2, 0], [2, 2, 0], [0, 0, 0]])


def test_rasterize_label_semantics():
    normal = AnnotationPolygon(_square(0, 0, 10, 20), [_square(1, 15, 3, 17)], N)  # left half, with a hole
    tumor = AnnotationPolygon(_square(5, 0, 20, 10), [], T)  # top right, overlapping normal
    exclude = AnnotationPolygon(_square(6, 2, 14, 6), [], X)  # inside tumor, half inside normal
    other = AnnotationPolygon(_square(0, 0, 20, 20), [], O)  # ignored
    mask = rasterize_annotations([other, normal, tumor, exclude], (20, 20), 1)
    expected = np.zeros((20, 20), np.uint8)
    expected[:, 0:10] = 1
    expected[15:17, 1:3] = 0
    expected[0:10, 5:20] = 2
    expected[2:6, 6:10] = 1  # excluded from tumor but inside the normal polygon
    expected[2:6, 10:14] = 0  # excluded and outside the normal polygon
    np.testing.assert_array_equal(mask, expected)
    areas = polygons_area([other, normal, tumor, exclude])
    assert areas == {N: 196.0, T: 150.0, X: 32.0, O: 400.0}


def test_rasterize_clips_with_a_warning():
    poly = AnnotationPolygon(_square(-10, 4, 8, 8), [], T)
    with pytest.warns(AnnotationWarning, match=r"slide.xml: 2 of 4 vertices \(1 polygon\(s\)\) lie outside"):
        mask = rasterize_annotations([poly], (10, 10), 1, path_for_errors="slide.xml")
    expected = np.zeros((10, 10), np.uint8)
    expected[4:8, 0:8] = 2
    np.testing.assert_array_equal(mask, expected)
    far = AnnotationPolygon(_square(100, 100, 120, 120), [], N)
    with pytest.warns(AnnotationWarning, match="4 of 4 vertices"):
        assert rasterize_annotations([far], (10, 10), 2).max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for polygons inside the extent
        rasterize_annotations([AnnotationPolygon(_square(0, 0, 20, 20), [], T)], (10, 10), 2)


def test_rasterize_rejects_bad_arguments():
    poly = AnnotationPolygon(_square(0, 0, 4, 4), [], T)
    with pytest.raises(ConfigError, match="`downsample`"):
        rasterize_annotations([poly], (4, 4), 0)
    with pytest.raises(ConfigError, match="`shape`"):
        rasterize_annotations([poly], (4, -1), 1)
    bad = AnnotationPolygon(np.array([[0, 0], [np.nan, 1], [2, 2]]), [], T)
    with pytest.raises(AnnotationError, match="x.json: polygon 0"):
        rasterize_annotations([bad], (4, 4), 1, path_for_errors="x.json")


# ------------------------------------------------------------------------------------------------------------
# label masks


def test_read_label_mask_png(tmp_path):
    from PIL import Image

    values = np.array([[0, 1, 255, 7], [128, 255, 1, 0]], dtype=np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "mask.png"), [[0, 2, 2, 0], [0, 2, 2, 0]])
    mask = read_label_mask(tmp_path / "mask.png", tumor_values=(255,), normal_values=(1, 128))
    np.testing.assert_array_equal(mask, [[0, 1, 2, 0], [1, 2, 1, 0]])
    assert mask.dtype == np.uint8
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "rgb.png"), [[0, 2, 2, 0], [0, 2, 2, 0]])
    colour = np.stack([values, values[::-1], values], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(AnnotationError, match="differing channels"):
        read_label_mask(tmp_path / "colour.png")
    with pytest.raises(AnnotationError, match="only TIFF masks have pyramid levels"):
        read_label_mask(tmp_path / "mask.png", level=1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(AnnotationError, match="broken.png: label mask image could not be read"):
        read_label_mask(tmp_path / "broken.png")
    with pytest.raises(ConfigError, match="overlap"):
        read_label_mask(tmp_path / "mask.png", tumor_values=(1,), normal_values=(1,))


def test_read_label_mask_pyramidal_tiff(tmp_path):
    import tifffile

    level0 = np.zeros((64, 96), np.uint8)
    level0[16:48, 32:80] = 255
    level0[0:8, 0:8] = 1
    level1 = level0[::2, ::2].copy()
    path = tmp_path / "mask.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, tile=(16, 16), subifds=1)
        tw.write(level1, tile=(16, 16), subfiletype=1)
    m0 = read_label_mask(path)
    assert m0.shape == (64, 96) and (m0 == 2).sum() == 32 * 48 + 64
    m1 = read_label_mask(path, level=1, tumor_values=(255,), normal_values=(1,))
    assert m1.shape == (32, 48) and (m1 == 2).sum() == 16 * 24 and (m1 == 1).sum() == 16
    with pytest.raises(AnnotationError, match="`level=2` does not exist; the mask has 2 level"):
        read_label_mask(path, level=2)
    with pytest.raises(AnnotationError, match="more than max_pixels=1000"):
        read_label_mask(path, max_pixels=1000)
    assert read_label_mask(path, level=1, max_pixels=2000).shape == (32, 48)
    # one page per level (no SubIFDs)
    flat = tmp_path / "pages.tif"
    with tifffile.TiffWriter(flat) as tw:
        tw.write(level0)
        tw.write(level1)
    assert read_label_mask(flat, level=1).shape == (32, 48)
    (tmp_path / "cut.tif").write_bytes(path.read_bytes()[:200])
    with pytest.raises(AnnotationError, match="cut.tif: label mask TIFF could not be read"):
        read_label_mask(tmp_path / "cut.tif")
    with pytest.raises(AnnotationError, match="label mask not found"):
        read_label_mask(tmp_path / "none.tif")
