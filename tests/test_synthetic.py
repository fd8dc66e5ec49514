"""Tests of the synthetic H&E-like slide generator (monai_wsi_ext.testing.synthetic)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

import numpy as np
from monai.utils import optional_import
from parameterized import parameterized

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.testing.synthetic import (
    SyntheticSlideConfig,
    _noise_grid,
    _noise_points,
    generate_dataset,
    generate_slide,
    pyramid_shapes,
    sidecar_paths,
)

tifffile, _ = optional_import("tifffile")
ET, _ = optional_import("defusedxml.ElementTree")
polygon_raster, _ = optional_import("skimage.draw", name="polygon")
binary_erosion, _ = optional_import("scipy.ndimage", name="binary_erosion")
binary_dilation, _ = optional_import("scipy.ndimage", name="binary_dilation")
label_components, _ = optional_import("skimage.measure", name="label")
CuImage, has_cucim = optional_import("cucim", name="CuImage")
openslide, has_openslide = optional_import("openslide")
tiffslide, has_tiffslide = optional_import("tiffslide")

REPO = Path(__file__).resolve().parents[1]
# small slides: 1536 x 1536 still gives the minimum of 3 levels; patch_size 128 leaves room for the knobs
KNOBS_ON = dict(width=1536, height=1536, patch_size=128, tumor_points=3, normal_looking_tumor_fraction=0.3)
KNOBS_OFF = dict(KNOBS_ON, tumor_points=0, normal_looking_tumor_fraction=0.0)
SEED = 8


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _xml_polygons(path: Path) -> list[np.ndarray]:
    root = ET.parse(str(path)).getroot()
    polys = []
    for ann in root.iter("Annotation"):
        assert ann.get("PartOfGroup") == "_0"
        coords = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        polys.append(np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords]))
    return polys


def _upsample(mask: np.ndarray, d: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(mask, d, axis=0), d, axis=1)[: shape[0], : shape[1]]


def _dark(img: np.ndarray) -> np.ndarray:
    """Nuclear pixels: dark and bluish-purple (hematoxylin), i.e. low green."""
    return img[..., 1].astype(np.int16) < 125


def _large_nuclei(img: np.ndarray, min_area: int = 70) -> np.ndarray:
    """Nuclear pixels in connected components of at least ``min_area`` pixels (tumor-sized nuclei)."""
    labels = label_components(_dark(img))
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    return areas[labels] >= min_area


class TestSyntheticSlides(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        root = Path(cls._tmp.name)
        cls.path = root / "a" / "slide.tif"
        cls.record = generate_slide(cls.path, SEED, SyntheticSlideConfig(**KNOBS_ON))
        cls.truth = dict(np.load(sidecar_paths(cls.path)["truth"]))
        cls.level0 = tifffile.imread(cls.path, key=0)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_record(self):
        rec = self.record
        self.assertEqual((rec["id"], rec["image"], rec["asap_xml"], rec["geojson"], rec["truth"]),
                         ("slide", "slide.tif", "slide.xml", "slide.geojson", "slide_truth.npz"))
        self.assertEqual((rec["width"], rec["height"], rec["mpp"], rec["levels"], rec["seed"]),
                         (1536, 1536, 0.5, 3, SEED))
        self.assertEqual(rec["knobs"]["tumor_points"], 3)
        self.assertEqual(rec["stats"]["tumor_points"], 3)
        self.assertGreater(rec["stats"]["normal_looking_cells"], 0)
        self.assertEqual(rec["stats"]["tumor_polygons"], 2)
        json.dumps(rec)  # JSON-serialisable

    def test_pyramid_structure(self):
        self.assertEqual(pyramid_shapes(1024, 1536), [(1536, 1024), (768, 512), (384, 256)])
        self.assertEqual(len(pyramid_shapes(50_000, 50_000)), 7)
        self.assertEqual(pyramid_shapes(4096, 4096)[-1], (1024, 1024))
        with tifffile.TiffFile(self.path) as tf:
            self.assertTrue(tf.is_bigtiff)
            self.assertEqual(len(tf.pages), 3)
            for level, page in enumerate(tf.pages):
                self.assertEqual(page.shape, (1536 // 2**level, 1536 // 2**level, 3))
                self.assertTrue(page.is_tiled)
                self.assertEqual((page.tilelength, page.tilewidth), (256, 256))
                self.assertEqual(page.compression, tifffile.COMPRESSION.JPEG)
                # RGB data; tifffile stores JPEG tiles as YCbCr, which every reader converts back
                self.assertIn(page.photometric, (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR))
                self.assertEqual(page.samplesperpixel, 3)
                self.assertEqual(page.subfiletype, 0 if level == 0 else 1)
                self.assertEqual(page.tags["ResolutionUnit"].value, tifffile.RESUNIT.CENTIMETER)
                num, den = page.tags["XResolution"].value
                self.assertAlmostEqual(1e4 / (num / den), 0.5 * 2**level, places=6)  # mpp from pixels per cm
            level1 = tf.pages[1].asarray()
        # each level is the 2x2 mean of the one above (up to JPEG error)
        mean0 = self.level0.reshape(768, 2, 768, 2, 3).mean(axis=(1, 3))
        self.assertLess(np.abs(mean0 - level1).mean(), 3.0)

    @parameterized.expand([("cucim", has_cucim), ("openslide", has_openslide), ("tiffslide", has_tiffslide)])
    def test_readers(self, name, available):
        if not available:
            self.skipTest(f"{name} not installed")
        x, y, size = 384, 640, 256
        ref = self.level0[y:y + size, x:x + size].astype(np.int16)
        if name == "cucim":
            img = CuImage(str(self.path))
            res = img.resolutions
            self.assertEqual(res["level_count"], 3)
            self.assertEqual(tuple(res["level_dimensions"][1]), (768, 768))
            self.assertAlmostEqual(img.spacing()[0], 0.5, places=4)
            region = np.asarray(img.read_region((x, y), (size, size), 0))
        else:
            module = openslide if name == "openslide" else tiffslide
            slide = module.OpenSlide(str(self.path)) if name == "openslide" else module.TiffSlide(str(self.path))
            self.assertEqual(slide.level_count, 3)
            self.assertEqual(tuple(slide.level_dimensions[2]), (384, 384))
            self.assertAlmostEqual(float(slide.properties[f"{name}.mpp-x"]), 0.5, places=4)
            region = np.asarray(slide.read_region((x, y), 0, (size, size)))
            slide.close()
        self.assertEqual(region.shape[:2], (size, size))
        self.assertLess(np.abs(region[..., :3].astype(np.int16) - ref).mean(), 2.0)

    def test_truth_matches_annotations(self):
        paths = sidecar_paths(self.path)
        polys = _xml_polygons(paths["asap_xml"])
        self.assertEqual(len(polys), 2)
        features = json.loads(paths["geojson"].read_text())["features"]
        self.assertEqual(len(features), 2)
        for poly, feat in zip(polys, features):
            self.assertEqual(feat["properties"]["classification"]["name"], "Tumor")
            ring = np.array(feat["geometry"]["coordinates"][0])
            np.testing.assert_allclose(ring[:-1], poly, atol=1e-3)
        d = int(self.truth["downsample"])
        tumor, tissue = self.truth["tumor"], self.truth["tissue"]
        self.assertEqual(tumor.shape, (1536 // d, 1536 // d))
        raster = np.zeros_like(tumor)
        for poly in polys:
            rr, cc = polygon_raster(poly[:, 1] / d - 0.5, poly[:, 0] / d - 0.5, shape=tumor.shape)
            raster[rr, cc] = True
        iou = (raster & tumor).sum() / (raster | tumor).sum()
        self.assertGreater(iou, 0.95)
        self.assertFalse((tumor & ~tissue).any(), "tumor must lie inside tissue")
        for poly in polys:  # every vertex lies inside tissue
            self.assertTrue(tissue[(poly[:, 1] // d).astype(int), (poly[:, 0] // d).astype(int)].all())
        self.assertTrue(0.15 < tissue.mean() < 0.7)

    def test_appearance(self):
        d = int(self.truth["downsample"])
        shape = self.level0.shape[:2]
        erode = np.ones((3, 3), bool)
        tumor = _upsample(binary_erosion(self.truth["tumor"] & self.truth["tumor_looking"], erode), d, shape)
        normal = _upsample(binary_erosion(self.truth["tissue"] & ~self.truth["tumor"] & ~self.truth["tumor_looking"],
                                          erode, iterations=2), d, shape)
        background = _upsample(binary_erosion(~self.truth["tissue"], erode, iterations=2), d, shape)
        self.assertGreater(tumor.sum(), 20_000)
        self.assertGreater(normal.sum(), 20_000)
        gray = self.level0.mean(axis=-1)
        dark = _dark(self.level0)
        # tumor: more nuclear pixels, larger nuclei and darker on average than normal tissue
        self.assertGreater(dark[tumor].mean(), 3 * dark[normal].mean())
        large = _large_nuclei(self.level0)
        self.assertGreater(large[tumor].mean(), 8 * large[normal].mean())
        self.assertLess(gray[tumor].mean(), gray[normal].mean() - 5)
        # background near white with a little noise
        self.assertGreater(self.level0[background].mean(axis=0).min(), 225)
        self.assertTrue(0.5 < gray[background].std() < 8)
        # the difference shows at 64 px: nuclear fraction of 64 px patches separates tumor from normal
        frac_t, frac_n = [], []
        for y in range(0, shape[0] - 63, 32):
            for x in range(0, shape[1] - 63, 32):
                if tumor[y:y + 64, x:x + 64].all():
                    frac_t.append(dark[y:y + 64, x:x + 64].mean())
                elif normal[y:y + 64, x:x + 64].all():
                    frac_n.append(dark[y:y + 64, x:x + 64].mean())
        self.assertGreater(len(frac_t), 5)
        self.assertGreater(np.median(frac_t), np.percentile(frac_n, 95))

    def test_knobs_render_as_documented(self):
        d, ps = int(self.truth["downsample"]), int(self.truth["patch_size"])
        tumor, looking = self.truth["tumor"], self.truth["tumor_looking"]
        dark = _large_nuclei(self.level0)  # tumor-sized nuclei
        normal_dark = dark[_upsample(self.truth["tissue"] & ~tumor & ~looking, d, dark.shape)].mean()
        # normal-looking cells: ground truth tumor, rendered with normal appearance
        cells = self.truth["normal_looking_cells"]
        self.assertGreater(len(cells), 0)
        cell_dark, tumor_dark = [], dark[_upsample(tumor & looking, d, dark.shape)].mean()
        for r, c in cells:
            self.assertGreater(tumor[r * ps // d:(r + 1) * ps // d, c * ps // d:(c + 1) * ps // d].mean(), 0.3)
            inner = _upsample(tumor & ~looking, d, dark.shape)[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps]
            cell_dark.append(dark[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps][inner].mean())
        self.assertLess(np.mean(cell_dark), 0.25 * tumor_dark)
        # tumor points: tumor-looking spots whose ground truth is normal
        centers = self.truth["tumor_point_centers"]
        self.assertEqual(centers.shape, (3, 2))
        for cx, cy in centers:
            self.assertFalse(tumor[int(cy) // d, int(cx) // d])
            self.assertTrue(looking[int(cy) // d, int(cx) // d])
            spot = dark[int(cy) - ps // 4:int(cy) + ps // 4, int(cx) - ps // 4:int(cx) + ps // 4]
            self.assertGreater(spot.mean(), 4 * normal_dark)
        self.assertTrue((tumor & ~looking).any() and (looking & ~tumor).any())

    def test_knobs_off(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "off.tif"
            rec = generate_slide(path, SEED, SyntheticSlideConfig(**KNOBS_OFF))
            truth = np.load(sidecar_paths(path)["truth"])
            self.assertEqual(len(truth["normal_looking_cells"]), 0)
            self.assertEqual(len(truth["tumor_point_centers"]), 0)
            np.testing.assert_array_equal(truth["tumor_looking"], truth["tumor"])
            self.assertEqual((rec["stats"]["tumor_points"], rec["stats"]["normal_looking_cells"]), (0, 0))
            # the knobs change the appearance, never the annotation
            self.assertEqual(_sha(sidecar_paths(path)["asap_xml"]), _sha(sidecar_paths(self.path)["asap_xml"]))
            np.testing.assert_array_equal(truth["tumor"], self.truth["tumor"])
            # ... and the pixels only in and around the knob cells (nuclei overhang + JPEG blocks: 32 px)
            ps = KNOBS_ON["patch_size"]
            cells = np.zeros((1536 // ps, 1536 // ps), bool)
            cells[tuple(self.truth["normal_looking_cells"].T)] = True
            for cx, cy in self.truth["tumor_point_centers"]:
                cells[int(cy) // ps, int(cx) // ps] = True
            coarse = binary_dilation(_upsample(cells, ps // 16, (96, 96)), np.ones((5, 5), bool))  # 16 px units
            near = _upsample(coarse, 16, (1536, 1536))
            diff = np.abs(tifffile.imread(path).astype(np.int16) - self.level0).max(axis=-1) > 0
            self.assertGreater(diff[near].mean(), 0.2)
            self.assertFalse(diff[~near].any())

    def test_determinism(self):
        with tempfile.TemporaryDirectory() as tmp:
            same = Path(tmp) / "same" / "slide.tif"
            other = Path(tmp) / "other" / "slide.tif"
            generate_slide(same, SEED, SyntheticSlideConfig(**KNOBS_ON))
            generate_slide(other, SEED + 1, SyntheticSlideConfig(**KNOBS_ON))
            for key, ref in sidecar_paths(self.path).items():
                self.assertEqual(_sha(sidecar_paths(same)[key]), _sha(ref), key)
            self.assertNotEqual(_sha(other), _sha(self.path))
            self.assertNotEqual(_sha(sidecar_paths(other)["asap_xml"]), _sha(sidecar_paths(self.path)["asap_xml"]))
            self.assertEqual(sorted(os.listdir(Path(tmp) / "same")),
                             ["slide.geojson", "slide.tif", "slide.xml", "slide_truth.npz"])  # no temp files left


class TestSyntheticMisc(unittest.TestCase):
    def test_noise_grid_matches_points(self):
        xs, ys = np.arange(300, 556) + 0.5, np.arange(40, 296) + 0.5
        grid = _noise_grid(xs, ys, 37.0, 123)
        points = _noise_points(xs[None, :], ys[:, None], 37.0, 123)
        np.testing.assert_allclose(grid, points, atol=1e-5)
        self.assertTrue(0.0 <= grid.min() and grid.max() <= 1.0 and grid.std() > 0.1)

    @parameterized.expand([
        ("tile", dict(tile_size=200)),
        ("fraction", dict(normal_looking_tumor_fraction=1.5)),
        ("radius", dict(nucleus_radius=(6.0, 3.0))),
        ("width", dict(width=10)),
        ("quality", dict(jpeg_quality=0)),
    ])
    def test_config_errors(self, _, kwargs):
        with self.assertRaises(ConfigError):
            SyntheticSlideConfig(**kwargs)

    def test_bad_arguments(self):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(ConfigError, "tif"):
                generate_slide(Path(tmp) / "x.png", 0, SyntheticSlideConfig(width=256, height=256))
            with self.assertRaisesRegex(ConfigError, "colour"):
                generate_dataset(tmp, colour=1)
            with self.assertRaisesRegex(ConfigError, "n_val"):
                generate_dataset(tmp, n_val=-1)

    def test_odd_size_tumor_free_slide(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "odd.tif"
            rec = generate_slide(path, 2, SyntheticSlideConfig(width=1000, height=700, tumor_regions=0, tumor_points=0))
            self.assertEqual(rec["stats"]["tumor_polygons"], 0)
            self.assertEqual(_xml_polygons(sidecar_paths(path)["asap_xml"]), [])
            self.assertFalse(np.load(sidecar_paths(path)["truth"])["tumor"].any())
            with tifffile.TiffFile(path) as tf:
                self.assertEqual([p.shape[:2] for p in tf.pages], [(700, 1000), (350, 500), (175, 250)])
                level0, level2 = tf.pages[0].asarray().astype(float), tf.pages[2].asarray().astype(float)
            # the last level is the 4x4 mean of level 0 up to the (odd) edges
            mean0 = level0.reshape(175, 4, 250, 4, 3).mean(axis=(1, 3))
            self.assertLess(np.abs(mean0 - level2).mean(), 4.0)

    def test_cli(self):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(REPO / "scripts" / "make_demo_slides.py"), "--output_dir", tmp, "--n_train", "1",
                   "--n_val", "0", "--n_test", "0", "--width", "512", "--height", "512", "--tumor_points", "0"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            self.assertEqual(out.returncode, 0, out.stderr)
            manifest = Path(out.stdout.strip().splitlines()[-1])
            self.assertEqual(manifest, Path(tmp) / "manifest.json")
            slides = json.loads(manifest.read_text())["slides"]
            self.assertEqual([(s["id"], s["knobs"]["tumor_points"]) for s in slides], [("train_000", 0)])

    def test_dataset_manifest_and_skip(self):
        with tempfile.TemporaryDirectory() as tmp:
            kw = dict(n_train=2, n_val=1, n_test=1, seed=3, width=512, height=512, tumor_regions=1, tumor_points=0)
            manifest_path = generate_dataset(tmp, **kw)
            manifest = json.loads(manifest_path.read_text())
            slides = manifest["slides"]
            self.assertEqual([s["id"] for s in slides], ["train_000", "train_001", "val_000", "test_000"])
            self.assertEqual([s["split"] for s in slides], ["train", "train", "val", "test"])
            self.assertEqual(manifest["splits"]["train"], ["train_000", "train_001"])
            self.assertEqual(len({s["seed"] for s in slides}), 4)
            for s in slides:
                for key in ("image", "asap_xml", "geojson", "truth"):
                    self.assertTrue((manifest_path.parent / s[key]).is_file(), s[key])
                self.assertEqual((s["width"], s["height"], s["mpp"]), (512, 512, 0.5))
                self.assertEqual(s["knobs"]["tumor_regions"], 1)
            image = manifest_path.parent / slides[0]["image"]
            inode = image.stat().st_ino
            again = json.loads(generate_dataset(tmp, **kw).read_text())
            self.assertEqual(again["slides"], slides)
            self.assertEqual(image.stat().st_ino, inode)  # kept, not rewritten
            generate_dataset(tmp, overwrite=True, **dict(kw, n_val=0, n_test=0, n_train=1))
            self.assertNotEqual(image.stat().st_ino, inode)  # rewritten (atomic rename gives a new file)


class TestSyntheticMemory(unittest.TestCase):
    def test_peak_memory_well_below_level0(self):
        """A 4096 x 4096 slide (48 MB at level 0) is written with a few MB of Python-allocated memory."""
        code = textwrap.dedent("""
            import sys, tempfile, tracemalloc
            from pathlib import Path
            import scipy.ndimage, tifffile, imagecodecs  # imports are not the generator's memory
            from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide
            with tempfile.TemporaryDirectory() as tmp:
                tracemalloc.start()
                generate_slide(Path(tmp) / "big.tif", 1, SyntheticSlideConfig(width=4096, height=4096))
                print(tracemalloc.get_traced_memory()[1])
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr)
        peak = int(out.stdout.strip().splitlines()[-1])
        self.assertLess(peak, 0.3 * 4096 * 4096 * 3)


if __name__ == "__main__":
    unittest.main()
