"""Tests of the feature canvas: scatter/gather, label canvas, canvas planning and windows, sliding-window forward."""

from __future__ import annotations

import unittest

import torch
from parameterized import parameterized

from monai_wsi_ext.model.canvas import (
    IGNORE_INDEX,
    CanvasLayout,
    canvas_forward,
    gather_from_canvas,
    inside_window,
    label_canvas,
    layout_canvas,
    plan_canvases,
    sample_window,
    scatter_to_canvas,
)

torch.set_num_threads(1)


def _unique_cells(n: int, h: int, w: int, seed: int = 0, r0: int = 0, c0: int = 0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(h * w, generator=g)[:n]
    return flat // w + r0, flat % w + c0


class TestScatterGather(unittest.TestCase):
    @parameterized.expand([("no_offset", (0, 0)), ("positive_offset", (7, 3)), ("negative_offset", (-2, -5))])
    def test_round_trip(self, _, offset):
        h, w, n, c = 6, 9, 20, 5
        rows, cols = _unique_cells(n, h, w, r0=offset[0], c0=offset[1])
        feats = torch.randn(n, c, generator=torch.Generator().manual_seed(1))
        canvas = scatter_to_canvas(feats, rows, cols, (h, w), offset)
        self.assertEqual(tuple(canvas.shape), (c, h, w))
        torch.testing.assert_close(gather_from_canvas(canvas, rows, cols, offset), feats, rtol=0, atol=0)
        # one cell checked by hand, every other cell zero
        self.assertTrue(torch.equal(canvas[:, rows[0] - offset[0], cols[0] - offset[1]], feats[0]))
        self.assertEqual(int((canvas.abs().sum(0) > 0).sum()), n)
        # batched gather
        batched = gather_from_canvas(torch.stack([canvas, 2 * canvas]), rows, cols, offset)
        self.assertEqual(tuple(batched.shape), (2, n, c))
        torch.testing.assert_close(batched[1], 2 * feats, rtol=0, atol=0)

    def test_cells_outside_are_dropped(self):
        rows = torch.tensor([0, 1, 5, -1])
        cols = torch.tensor([0, 1, 1, 0])
        feats = torch.arange(8.0).reshape(4, 2)
        canvas = scatter_to_canvas(feats, rows, cols, (3, 3))
        self.assertEqual(float(canvas.sum()), float(feats[:2].sum()))
        inside = inside_window(rows, cols, (3, 3))
        self.assertEqual(inside.tolist(), [True, True, False, False])
        torch.testing.assert_close(gather_from_canvas(canvas, rows[inside], cols[inside]), feats[:2])
        with self.assertRaisesRegex(ValueError, "outside"):
            gather_from_canvas(canvas, rows, cols)

    def test_gradcheck(self):
        rows = torch.tensor([0, 2, 1, 3])
        cols = torch.tensor([1, 0, 2, 3])
        feats = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(lambda f: scatter_to_canvas(f, rows, cols, (4, 5), (0, -1)), (feats,)))
        canvas = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(lambda c: gather_from_canvas(c, rows, cols, (0, -1)), (canvas,)))

    def test_gradient_values(self):
        rows, cols = torch.tensor([0, 1]), torch.tensor([1, 0])
        feats = torch.ones(2, 3, requires_grad=True)
        weight = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)
        (scatter_to_canvas(feats, rows, cols, (2, 2)) * weight).sum().backward()
        torch.testing.assert_close(feats.grad, torch.stack([weight[:, 0, 1], weight[:, 1, 0]]))


class TestLabelCanvas(unittest.TestCase):
    def test_values(self):
        labels = torch.tensor([1, 0, -1, 1])
        rows = torch.tensor([10, 10, 11, 30])
        cols = torch.tensor([5, 6, 5, 5])
        lab = label_canvas(labels, rows, cols, (2, 3), (10, 4))
        expected = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
        self.assertEqual(lab.dtype, torch.long)
        self.assertTrue(torch.equal(lab, expected))
        self.assertEqual(IGNORE_INDEX, -1)


class TestPlanCanvases(unittest.TestCase):
    def test_slide_centring(self):
        # bounding box rows 5..7 (3), cols 10..14 (5) on an 8x8 canvas: offset (5 - 2, 10 - 1)
        rows = torch.tensor([5, 6, 7, 5])
        cols = torch.tensor([10, 12, 14, 11])
        (lay,) = plan_canvases(rows, cols, 8, mode="slide")
        self.assertTrue(lay.fits)
        self.assertEqual(lay.size, (8, 8))
        self.assertEqual(lay.offset, (3, 9))
        self.assertEqual(lay.indices.tolist(), [0, 1, 2, 3])
        canvas = layout_canvas(torch.ones(4, 1), lay)
        occupied = torch.nonzero(canvas[0]).tolist()
        self.assertEqual(sorted(occupied), sorted([[2, 1], [3, 3], [4, 5], [2, 2]]))

    def test_lumps(self):
        occ = torch.zeros(12, 14, dtype=torch.bool)
        occ[1:3, 1:4] = True  # blob 1 (6 cells)
        occ[6:9, 2:3] = True  # blob 2 (3 cells)
        occ[3, 4] = True  # diagonal neighbour of blob 1 -> same lump with 8-connectivity
        occ[5:7, 9:13] = True  # blob 3 (8 cells)
        rows, cols = torch.nonzero(occ, as_tuple=True)
        layouts = plan_canvases(rows, cols, 8, mode="lumps")
        self.assertEqual(len(layouts), 3)
        self.assertEqual(sorted(len(lay) for lay in layouts), [3, 7, 8])
        self.assertEqual(sorted(torch.cat([lay.indices for lay in layouts]).tolist()), list(range(len(rows))))
        for lay in layouts:
            self.assertTrue(lay.fits)
            self.assertEqual(lay.size, (8, 8))
            feats = torch.randn(len(lay), 3)
            canvas = layout_canvas(feats, lay)
            back = gather_from_canvas(canvas, lay.rows, lay.cols, lay.offset)
            torch.testing.assert_close(back, feats, rtol=0, atol=0)
        # explicit component ids override connectivity
        comp = torch.zeros(len(rows), dtype=torch.long)
        self.assertEqual(len(plan_canvases(rows, cols, 16, mode="lumps", tissue_components=comp)), 1)

    def test_too_large_is_not_cut(self):
        rows, cols = _unique_cells(60, 20, 37, seed=3, r0=4, c0=-2)
        (lay,) = plan_canvases(rows, cols, 16, mode="slide", multiple=16)
        self.assertFalse(lay.fits)
        self.assertEqual(lay.size, (32, 48))
        self.assertEqual(len(lay), 60)
        self.assertTrue(bool(inside_window(rows, cols, lay.size, lay.offset).all()))
        feats = torch.randn(60, 2)
        canvas = layout_canvas(feats, lay)
        torch.testing.assert_close(gather_from_canvas(canvas, rows, cols, lay.offset), feats, rtol=0, atol=0)

    def test_sample_window(self):
        rows, cols = _unique_cells(80, 30, 30, seed=5)
        (lay,) = plan_canvases(rows, cols, 8)
        self.assertFalse(lay.fits)
        g = torch.Generator().manual_seed(0)
        weights = torch.zeros(80)
        weights[17] = 1.0
        for _ in range(10):
            win = sample_window(lay, 8, g)
            self.assertEqual(win.size, (8, 8))
            self.assertTrue(win.fits)
            self.assertGreater(len(win), 0)
            inside = inside_window(rows, cols, (8, 8), win.offset)
            self.assertEqual(sorted(win.indices.tolist()), torch.nonzero(inside)[:, 0].tolist())
            self.assertTrue(torch.equal(win.rows, rows[win.indices]) and torch.equal(win.cols, cols[win.indices]))
            # the window stays inside the layout
            self.assertTrue(lay.offset[0] <= win.offset[0] <= lay.offset[0] + lay.size[0] - 8)
            self.assertTrue(lay.offset[1] <= win.offset[1] <= lay.offset[1] + lay.size[1] - 8)
            feats = torch.randn(len(win), 4)
            canvas = layout_canvas(feats, win)
            torch.testing.assert_close(gather_from_canvas(canvas, win.rows, win.cols, win.offset), feats)
            self.assertIn(17, sample_window(lay, 8, g, weights=weights).indices.tolist())
        fitting = CanvasLayout((0, 0), (8, 8), torch.arange(2), torch.tensor([0, 1]), torch.tensor([0, 0]))
        self.assertIs(sample_window(fitting, 8, g), fitting)

    def test_bad_mode(self):
        with self.assertRaisesRegex(ValueError, "mode"):
            plan_canvases(torch.tensor([0]), torch.tensor([0]), 8, mode="tiles")


class TestCanvasForward(unittest.TestCase):
    def test_direct_and_sliding_window(self):
        from monai.networks.nets import UNet

        torch.manual_seed(0)
        unet = UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
        small = torch.randn(3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(canvas_forward(unet, small, 16), unet(small[None])[0])
            big = torch.randn(2, 3, 40, 56)
            out = canvas_forward(unet, big, 16)
        self.assertEqual(tuple(out.shape), (2, 2, 40, 56))
        self.assertTrue(bool(torch.isfinite(out).all()))
        self.assertEqual(tuple(canvas_forward(unet, big[0], 16).shape), (2, 40, 56))


if __name__ == "__main__":
    unittest.main()
