"""Exactness of the surrogate-loss end-to-end step and the end-to-end trainer.

The reference is ordinary back-propagation through the whole graph: every placed patch through the encoder at once
(eval mode), scatter onto the canvas(es), U-Net, loss, backward. ``e2e_step`` must give the same gradient for every
parameter of both networks.
"""

from __future__ import annotations

import unittest

import numpy as np
import torch
from parameterized import parameterized
from torch import nn

from monai.engines.utils import IterationEvents
from monai.networks.nets import UNet
from monai_wsi_ext.model.canvas import IGNORE_INDEX, plan_canvases, sample_window, scatter_to_canvas, layout_label_canvas
from monai_wsi_ext.model.predict import canvas_probabilities, encode_batches, eval_mode
from monai_wsi_ext.engines.e2e import (
    NonFiniteLossError,
    SurrogateE2ETrainer,
    draw_seeds,
    e2e_step,
    slide_collate,
)

torch.set_num_threads(2)


class TinyEncoder(nn.Module):
    """Conv + BatchNorm + pooling + linear feature layer (+ head, unused in end-to-end training)."""

    def __init__(self, feature_dim: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(0.5)
        self.feature = nn.Linear(5, feature_dim)
        self.head = nn.Linear(feature_dim, 2)
        with torch.no_grad():  # non-trivial frozen statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def features(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.feature(self.drop(h.mean(dim=(2, 3))))

    def forward(self, x):
        return self.head(self.features(x))


class FakeSource:
    """In-memory patches with seed-replayed 'augmentation' (flip + seeded noise); records every call."""

    def __init__(self, n: int, size: int = 8, dtype=torch.float64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.patches = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
        self.calls: list[tuple[list[int], list[int]]] = []

    def __len__(self):
        return self.patches.shape[0]

    def augment(self, i: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        p = self.patches[i]
        if seed % 2:
            p = p.flip(-1)
        return p + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)

    def load(self, indices, seeds):
        self.calls.append((indices.tolist(), seeds.tolist()))
        return torch.stack([self.augment(int(i), int(s)) for i, s in zip(indices, seeds)])


def _grid(n: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(h * w, generator=g)[:n]
    return flat // w + 2, flat % w - 1


def _labels(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 2, (n,), generator=g)
    lab[::4] = -1
    return lab


def _tiny_unet(in_channels: int, dtype=torch.float64):
    torch.manual_seed(3)
    return UNet(2, in_channels, 2, channels=(4, 8), strides=(2,), num_res_units=1).to(dtype).train()


def _reference_grads(encoder, unet, source, seeds, labels, layouts, loss_fn, detach_outside=None):
    """Plain back-propagation through the whole graph; returns {name: grad} for both networks."""
    encoder.zero_grad(set_to_none=True)
    unet.zero_grad(set_to_none=True)
    used = torch.unique(torch.cat([lay.indices for lay in layouts]))
    with eval_mode(encoder):
        x = encoder.features(torch.stack([source.augment(int(i), int(seeds[i])) for i in used]))
        if detach_outside is not None:
            keep = torch.isin(used, detach_outside)[:, None]
            x = torch.where(keep, x, x.detach())
        canvas = torch.stack(
            [
                scatter_to_canvas(x[torch.searchsorted(used, lay.indices)], lay.rows, lay.cols, lay.size, lay.offset)
                for lay in layouts
            ]
        )
        targets = torch.stack([layout_label_canvas(labels, lay) for lay in layouts])
        loss = loss_fn(unet(canvas), targets)
    loss.backward()
    return _grads(encoder, unet), loss.detach()


def _grads(encoder, unet):
    out = {f"encoder.{k}": (None if p.grad is None else p.grad.clone()) for k, p in encoder.named_parameters()}
    out.update({f"unet.{k}": (None if p.grad is None else p.grad.clone()) for k, p in unet.named_parameters()})
    return out


def _assert_grads_equal(case, got, ref, rtol, skip=("encoder.head",)):
    scale = max(float(v.abs().max()) for v in ref.values() if v is not None)
    for name, r in ref.items():
        if name.startswith(skip):
            case.assertIsNone(got[name], name)
            continue
        case.assertIsNotNone(r, name)
        case.assertIsNotNone(got[name], name)
        case.assertGreater(float(r.abs().max()), 0.0, f"{name}: zero reference gradient makes the test vacuous")
        err = float((got[name] - r).abs().max())
        case.assertLessEqual(err, rtol * max(float(r.abs().max()), 1e-3 * scale), f"{name}: max abs error {err:.3g}")


class TestE2EExactness(unittest.TestCase):
    def _setup(self, n=10, canvas=8, mode="slide"):
        source = FakeSource(n)
        if mode == "slide":
            rows, cols = _grid(n, 6, 7, seed=1)
        else:  # two separate lumps of 5 patches each
            rows = torch.tensor([0, 0, 1, 1, 2, 10, 10, 11, 12, 12])
            cols = torch.tensor([0, 1, 0, 1, 1, 5, 6, 6, 6, 7])
        labels = _labels(n, seed=2)
        layouts = plan_canvases(rows, cols, canvas, mode=mode)
        torch.manual_seed(0)
        encoder = TinyEncoder(feature_dim=3).double().train()
        unet = _tiny_unet(3)
        seeds = draw_seeds(n, torch.Generator().manual_seed(7))
        return source, rows, cols, labels, layouts, encoder, unet, seeds

    @parameterized.expand(
        [
            ("chunk1", 1, "slide"),
            ("chunk3", 3, "slide"),
            ("chunkN", 10, "slide"),
            ("lumps_chunk3", 3, "lumps"),
        ]
    )
    def test_gradients_equal_full_backprop(self, _, chunk, mode):
        source, rows, cols, labels, layouts, encoder, unet, seeds = self._setup(mode=mode)
        if mode == "lumps":
            self.assertEqual(len(layouts), 2)
        loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        ref, ref_loss = _reference_grads(encoder, unet, source, seeds, labels, layouts, loss_fn)
        encoder.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        res = e2e_step(
            encoder, unet, source.load, len(source), rows, cols, labels, layouts, loss_fn, chunk_size=chunk, seeds=seeds
        )
        self.assertTrue(res["finite"])
        self.assertFalse(res["skipped"])
        self.assertEqual(res["n_used"], 10)
        self.assertEqual(res["n_encoder_grad"], 10)
        torch.testing.assert_close(res["loss"], ref_loss.float())
        _assert_grads_equal(self, _grads(encoder, unet), ref, rtol=1e-6)
        self.assertTrue(encoder.training and encoder.bn.training, "encoder modes must be restored")

    def test_grad_scale_and_accumulation(self):
        source, rows, cols, labels, layouts, encoder, unet, seeds = self._setup()
        loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        ref, _ = _reference_grads(encoder, unet, source, seeds, labels, layouts, loss_fn)
        encoder.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        for _ in range(2):  # two half-weighted steps accumulate to one full gradient
            e2e_step(
                encoder, unet, source.load, 10, rows, cols, labels, layouts, loss_fn, 4, grad_scale=0.5, seeds=seeds
            )
        _assert_grads_equal(self, _grads(encoder, unet), ref, rtol=1e-6)
        # a loss scaler (GradScaler.scale) multiplies every gradient, the encoder's included
        encoder.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        e2e_step(encoder, unet, source.load, 10, rows, cols, labels, layouts, loss_fn, 4, seeds=seeds,
                 loss_scaler=lambda loss: loss * 8.0)
        scaled_ref = {k: None if v is None else 8.0 * v for k, v in ref.items()}
        _assert_grads_equal(self, _grads(encoder, unet), scaled_ref, rtol=1e-6)

    def test_window_of_large_grid(self):
        n = 40
        source = FakeSource(n)
        rows, cols = _grid(n, 12, 12, seed=4)
        labels = _labels(n, seed=5)
        (big,) = plan_canvases(rows, cols, 8)
        self.assertFalse(big.fits)
        win = sample_window(big, 8, torch.Generator().manual_seed(1))
        self.assertLess(len(win), n)
        torch.manual_seed(0)
        encoder, unet = TinyEncoder(3).double(), _tiny_unet(3)
        seeds = draw_seeds(n, torch.Generator().manual_seed(2))
        loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        ref, _ = _reference_grads(encoder, unet, source, seeds, labels, [win], loss_fn)
        encoder.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        res = e2e_step(encoder, unet, source.load, n, rows, cols, labels, win, loss_fn, chunk_size=3, seeds=seeds)
        _assert_grads_equal(self, _grads(encoder, unet), ref, rtol=1e-6)
        loaded = sorted(i for call in source.calls for i in call[0])
        self.assertEqual(loaded, sorted(win.indices.tolist() * 2), "only the window's patches are encoded")
        self.assertEqual(res["n_used"], len(win))

    def test_subset(self):
        source, rows, cols, labels, layouts, encoder, unet, seeds = self._setup()
        loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        subset = torch.tensor([1, 4, 5, 8])
        ref_full, _ = _reference_grads(encoder, unet, source, seeds, labels, layouts, loss_fn)
        ref_sub, _ = _reference_grads(encoder, unet, source, seeds, labels, layouts, loss_fn, detach_outside=subset)
        encoder.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        source.calls.clear()
        res = e2e_step(
            encoder, unet, source.load, 10, rows, cols, labels, layouts, loss_fn,
            chunk_size=3, subset=subset, seeds=seeds,
        )
        got = _grads(encoder, unet)
        self.assertEqual(res["n_encoder_grad"], 4)
        _assert_grads_equal(self, got, ref_sub, rtol=1e-6)
        for name in ref_full:  # U-Net gradients are those of the full step
            if name.startswith("unet."):
                torch.testing.assert_close(got[name], ref_full[name], rtol=1e-6, atol=1e-12)
        diff = float((got["encoder.conv.weight"] - ref_full["encoder.conv.weight"]).abs().max())
        self.assertGreater(diff, 1e-6, "a subset must change the encoder gradient")
        second_pass = [i for call in source.calls[4:] for i in call[0]]  # 4 chunks of 10 in pass 1
        self.assertEqual(sorted(second_pass), subset.tolist())

    def test_patches_loaded_twice_with_same_seeds(self):
        source, rows, cols, labels, layouts, encoder, unet, _ = self._setup()
        loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        res = e2e_step(
            encoder, unet, source.load, 10, rows, cols, labels, layouts, loss_fn, chunk_size=3,
            generator=torch.Generator().manual_seed(11),
        )
        self.assertEqual(len(source.calls), 8)  # 4 chunks (3, 3, 3, 1), each read in both passes
        self.assertEqual(source.calls[:4], source.calls[4:])
        self.assertEqual([len(c[0]) for c in source.calls[:4]], [3, 3, 3, 1])
        self.assertEqual(sorted(i for c in source.calls[:4] for i in c[0]), list(range(10)))
        expected_seeds = draw_seeds(10, torch.Generator().manual_seed(11))
        self.assertTrue(torch.equal(res["seeds"], expected_seeds))
        for idx, seeds in source.calls:
            self.assertEqual(seeds, expected_seeds[idx].tolist())

    def test_nonfinite_loss_and_grad_leave_grads_untouched(self):
        source, rows, cols, labels, layouts, encoder, unet, seeds = self._setup()
        for p in list(encoder.parameters()) + list(unet.parameters()):
            p.grad = torch.full_like(p, 0.5)

        def nan_loss(logits, target):
            return logits.sum() * float("nan")

        def inf_grad_loss(logits, target):  # finite value (0), non-finite gradient
            return (logits - logits.detach()).abs().sqrt().sum()

        for fn, reason in ((nan_loss, "loss"), (inf_grad_loss, "grad")):
            source.calls.clear()
            res = e2e_step(encoder, unet, source.load, 10, rows, cols, labels, layouts, fn, chunk_size=5, seeds=seeds)
            self.assertFalse(res["finite"])
            self.assertEqual(res["nonfinite_reason"], reason)
            self.assertEqual(len(source.calls), 2, "the second pass must not run")
            for p in list(encoder.parameters()) + list(unet.parameters()):
                self.assertTrue(torch.all(p.grad == 0.5))

    def test_no_labels_skipped(self):
        source, rows, cols, _, layouts, encoder, unet, seeds = self._setup()
        res = e2e_step(
            encoder, unet, source.load, 10, rows, cols, torch.full((10,), -1), layouts,
            nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), seeds=seeds,
        )
        self.assertTrue(res["skipped"])
        self.assertEqual(source.calls, [])
        self.assertTrue(all(p.grad is None for p in unet.parameters()))


class TestE2ERealBackbones(unittest.TestCase):
    @parameterized.expand([("googlenet",), ("densenet121",)])
    def test_float32_exactness(self, backbone):
        from monai_wsi_ext.model.networks import PatchEncoder

        torch.manual_seed(0)
        n = 6
        encoder = PatchEncoder(backbone, feature_dim=16).train()
        unet = _tiny_unet(16, torch.float32)
        source = FakeSource(n, size=64, dtype=torch.float32, seed=1)
        rows = torch.tensor([0, 0, 1, 1, 2, 3])
        cols = torch.tensor([0, 2, 1, 3, 0, 2])
        labels = torch.tensor([1, 0, 1, -1, 0, 1])
        layouts = plan_canvases(rows, cols, 4)
        seeds = draw_seeds(n, torch.Generator().manual_seed(3))
        loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        ref, _ = _reference_grads(encoder, unet, source, seeds, labels, layouts, loss_fn)
        encoder.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        e2e_step(encoder, unet, source.load, n, rows, cols, labels, layouts, loss_fn, chunk_size=4, seeds=seeds)
        got = _grads(encoder, unet)
        names = [k for k, v in ref.items() if v is not None]
        self.assertTrue(all(got[k] is not None for k in names))
        self.assertTrue(all(got[k] is None for k, v in ref.items() if v is None))
        ref_vec = torch.cat([ref[k].flatten() for k in names])
        err_vec = torch.cat([(got[k] - ref[k]).flatten() for k in names])
        self.assertGreater(float(ref_vec.norm()), 0.0)
        self.assertLessEqual(float(err_vec.norm() / ref_vec.norm()), 1e-5)
        self.assertLessEqual(float(err_vec.abs().max()), 1e-5 * float(ref_vec.abs().max()))
        self.assertTrue(encoder.training)


def _slide(n, h, w, seed):
    rows, cols = _grid(n, h, w, seed)
    return {
        "patch_source": FakeSource(n, size=8, dtype=torch.float32, seed=seed),
        "rows": rows,
        "cols": cols,
        "labels": _labels(n, seed + 1),
    }


class TestTrainer(unittest.TestCase):
    def _trainer(self, slides, loss_function=None, **kwargs):
        from torch.utils.data import DataLoader

        torch.manual_seed(0)
        encoder, unet = TinyEncoder(4), _tiny_unet(4, torch.float32)
        loader = DataLoader(slides, batch_size=1, collate_fn=slide_collate)
        trainer = SurrogateE2ETrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=loader,
            encoder=encoder,
            unet=unet,
            encoder_optimizer=torch.optim.SGD(encoder.parameters(), lr=0.1),
            unet_optimizer=torch.optim.Adam(unet.parameters(), lr=1e-2),
            loss_function=loss_function,
            chunk_size=3,
            **{"canvas_size": 8, **kwargs},
        )
        return trainer, encoder, unet

    @parameterized.expand([("dict_output", False), ("decollated_output", True)])
    def test_two_iterations(self, _, decollate):
        from monai.handlers import StatsHandler, from_engine

        slides = [_slide(12, 5, 6, seed=1), _slide(30, 12, 14, seed=2)]  # the second is larger than the canvas
        loss_of = from_engine(["loss"], first=True) if decollate else (lambda out: out["loss"])
        trainer, encoder, unet = self._trainer(
            slides,
            subset_size=8,
            decollate=decollate,
            train_handlers=[StatsHandler(name="e2e_test", output_transform=loss_of, tag_name="e2e_loss")],
        )
        before = {k: v.clone() for k, v in list(encoder.state_dict().items()) + list(unet.state_dict().items())}
        seen = []

        def _record(engine):
            out = engine.state.output
            self.assertIsInstance(out, list if decollate else dict)
            seen.append(dict(out[0] if decollate else out))

        trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, _record)
        with self.assertLogs("e2e_test", level="INFO") as logs:
            trainer.run()
        self.assertEqual(sum("e2e_loss" in line for line in logs.output), 2)
        self.assertEqual(trainer.state.iteration, 2)
        self.assertEqual(len(seen), 2)
        for out in seen:
            self.assertEqual(set(out) >= {"image", "label", "pred", "loss", "patch_index"}, True)
            self.assertEqual(out["loss"].ndim, 0)
            self.assertTrue(bool(torch.isfinite(out["loss"])))
            self.assertEqual(out["pred"].shape, out["label"].shape)
            self.assertGreater(out["pred"].numel(), 0)
            self.assertTrue(bool(((out["pred"] >= 0) & (out["pred"] <= 1)).all()))
            self.assertTrue(set(out["label"].tolist()) <= {0, 1})
            self.assertEqual(tuple(out["image"].shape[1:]), (4, 8, 8))
        self.assertEqual(trainer.state.nonfinite_skipped, 0)
        self.assertFalse(torch.equal(before["conv.weight"], encoder.conv.weight))
        self.assertFalse(torch.equal(before["feature.weight"], encoder.feature.weight))
        self.assertTrue(torch.equal(before["head.weight"], encoder.head.weight), "the head is unused end to end")
        self.assertTrue(torch.equal(before["bn.running_mean"], encoder.bn.running_mean), "BN statistics frozen")
        changed = [k for k, v in unet.state_dict().items() if not torch.equal(before[k], v)]
        self.assertGreater(len(changed), 0)
        self.assertTrue(all(p.grad is None or not p.grad.any() for p in unet.parameters()), "zeroed after step")

    def test_lumps_mode_batches_canvases(self):
        rows = torch.tensor([0, 0, 1, 1, 9, 9, 10, 10, 11])
        cols = torch.tensor([0, 1, 0, 1, 7, 8, 7, 8, 8])
        slide = {"patch_source": FakeSource(9, dtype=torch.float32), "rows": rows, "cols": cols,
                 "labels": torch.tensor([1, 0, 1, 0, 0, 1, -1, 1, 0])}
        trainer, _, _ = self._trainer([slide], canvas_mode="lumps")
        shapes = []
        trainer.add_event_handler(
            IterationEvents.MODEL_COMPLETED, lambda e: shapes.append(e.state.output["image"].shape)
        )
        trainer.run()
        self.assertEqual([tuple(s) for s in shapes], [(2, 4, 8, 8)])

    def test_config_errors(self):
        from monai_wsi_ext.errors import ConfigError

        with self.assertRaisesRegex(ConfigError, "divisible"):
            self._trainer([], canvas_size=9)
        with self.assertRaisesRegex(ConfigError, "nonfinite"):
            self._trainer([], nonfinite="ignore")
        with self.assertWarnsRegex(UserWarning, "CUDA"):
            trainer, _, _ = self._trainer([], amp=True)
        self.assertFalse(trainer.amp)

    @unittest.skipUnless(torch.cuda.is_available(), "needs CUDA for mixed precision")
    def test_amp_on_cuda(self):
        from torch.utils.data import DataLoader

        torch.manual_seed(0)
        encoder, unet = TinyEncoder(4).cuda(), _tiny_unet(4, torch.float32).cuda()
        before = [p.detach().clone() for p in list(encoder.parameters()) + list(unet.parameters())]
        trainer = SurrogateE2ETrainer(
            device="cuda", max_epochs=1,
            train_data_loader=DataLoader([_slide(12, 5, 6, seed=s) for s in (1, 2)], batch_size=1,
                                         collate_fn=slide_collate),
            encoder=encoder, unet=unet, encoder_optimizer=torch.optim.SGD(encoder.parameters(), lr=0.1),
            unet_optimizer=torch.optim.Adam(unet.parameters(), lr=1e-2), chunk_size=5, canvas_size=8, amp=True,
        )
        trainer.run()
        self.assertEqual(trainer.state.iteration, 2)
        self.assertTrue(bool(torch.isfinite(trainer.state.output["loss"])))
        after = list(encoder.parameters()) + list(unet.parameters())
        self.assertTrue(any(not torch.equal(b, a) for b, a in zip(before, after)))

    def test_nonfinite_skip_and_raise(self):
        def nan_loss(logits, target):
            return logits.mean() * float("nan")

        slides = [_slide(12, 5, 6, seed=1), _slide(12, 5, 6, seed=3)]
        trainer, encoder, unet = self._trainer(slides, loss_function=nan_loss)
        before = [p.clone() for p in list(encoder.parameters()) + list(unet.parameters())]
        trainer.run()
        self.assertEqual(trainer.state.nonfinite_skipped, 2)
        for b, p in zip(before, list(encoder.parameters()) + list(unet.parameters())):
            self.assertTrue(torch.equal(b, p))
        trainer, _, _ = self._trainer(slides, loss_function=nan_loss, nonfinite="raise")
        with self.assertRaises(NonFiniteLossError):
            trainer.run()

    def test_accumulation_steps(self):
        slides = [_slide(12, 5, 6, seed=s) for s in (1, 2, 3)]
        trainer, _, _ = self._trainer(slides, accumulation_steps=2)
        trainer.run()
        state = next(iter(trainer.unet_optimizer.state.values()))
        self.assertEqual(int(state["step"]), 2)  # after slide 2, and at the end of the epoch (slide 3)

    def test_inference_path(self):
        """The production path (encode in eval mode, canvas U-Net with a sliding window over a grid larger than
        the canvas) gives per-patch probabilities that sum to one and leaves both networks' modes as they were."""
        n = 30
        slide = _slide(n, 12, 14, seed=4)
        torch.manual_seed(0)
        encoder, unet = TinyEncoder(4), _tiny_unet(4, torch.float32)
        src = slide["patch_source"]
        with eval_mode(encoder):
            chunks = [torch.arange(s, min(s + 7, n)) for s in range(0, n, 7)]
            x, _ = encode_batches(encoder, (src.load(i, torch.zeros_like(i)) for i in chunks))
        probs = canvas_probabilities(unet, x, slide["rows"], slide["cols"], canvas_size=8, class_index=None)
        self.assertEqual(probs.shape, (n, 2))
        np.testing.assert_allclose(probs.sum(1), np.ones(n), rtol=1e-5)
        self.assertTrue(unet.training and encoder.training)
        # the same features straight from encode_patches (the end-to-end step's first pass)
        from monai_wsi_ext.engines.e2e import encode_patches

        with eval_mode(encoder):
            x2 = encode_patches(encoder, src.load, torch.arange(n), torch.zeros(n, dtype=torch.long), chunk_size=7)
        torch.testing.assert_close(x, x2)

if __name__ == "__main__":
    unittest.main()
