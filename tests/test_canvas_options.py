"""The canvas ablation options (issue 11, item 2): feature noise, cell dropout, class weights, the encoder's
probability as a canvas channel and a loss weight for nolabel cells. Each does what it says, and the defaults
reproduce the paper's (previous) behaviour exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from monai_wsi_ext.data.features import (
    NOLABEL_TUMOR_FRACTION,
    CanvasDataset,
    canvas_class_weights,
    load_feature_file,
)
from monai_wsi_ext.errors import ConfigError, MonaiWsiExtError
from monai_wsi_ext.model.canvas import (
    IGNORE_INDEX,
    gather_from_canvas,
    label_canvas,
    layout_canvas,
    plan_canvases,
    sample_window,
    scatter_to_canvas,
)
from monai_wsi_ext.model.networks import NOLABEL_TARGET_BASE, CanvasCrossEntropyLoss, nolabel_target
from monai_wsi_ext.model.predict import CanvasInferer, canvas_probabilities
from monai_wsi_ext.prep.grid import PatchLabel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
FEATURE_DIM = 16


def _write_slide(feat_dir: Path, sid: str, split: str, shape: tuple[int, int], n: int, rng: np.random.Generator,
                 **fields) -> dict:
    """A feature file as ``FeatureExtractor`` writes it, with random features (scale differs per channel)."""
    h, w = shape
    cells = rng.choice(h * w, size=n, replace=False)
    d = {"features": (rng.normal(size=(n, FEATURE_DIM)) * rng.uniform(0.5, 3.0, FEATURE_DIM)).astype(np.float32),
         "probs": rng.random(n).astype(np.float32), "rows": cells // w, "cols": cells % w,
         "labels": rng.choice([-1, 0, 1], size=n, p=[0.3, 0.5, 0.2]).astype(np.int64)}
    d.update(fields)
    np.savez(feat_dir / f"{sid}.npz", **d, grid_shape=np.asarray([h, w]), cell_size=np.float64(64),
             split=np.str_(split), slide_id=np.str_(sid), image=np.str_("x"), cache_key=np.str_("k"))
    return d


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory) -> Path:
    """Two training slides (one fits a 32-cell canvas, one is larger: random windows) and one validation slide."""
    feat = tmp_path_factory.mktemp("canvas_options") / "features"
    feat.mkdir()
    rng = np.random.default_rng(0)
    _write_slide(feat, "a", "training", (24, 24), 400, rng)
    _write_slide(feat, "b", "training", (50, 40), 900, rng)
    _write_slide(feat, "c", "validation", (30, 30), 300, rng)
    return feat


def _parser(*configs: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), *(str(CONFIGS / c) for c in configs)])
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _old_getitem(ds: CanvasDataset, index: int) -> dict:
    """``CanvasDataset.__getitem__`` as it was before the options (the paper's training items), for comparison."""
    item = ds.items[index]
    lay = item["layout"]
    if ds.train and tuple(lay.size) != (ds.canvas_size, ds.canvas_size):
        labelled = (item["labels"][lay.indices.long()] != PatchLabel.NOLABEL).float()
        lay = sample_window(lay, ds.canvas_size, ds.generator, weights=labelled if labelled.sum() else None)
    idx = lay.indices.long()
    canvas = layout_canvas(item["features"][idx], lay)
    target = label_canvas(item["labels"][idx], lay.rows, lay.cols, lay.size, lay.offset)
    if ds.train and ds.augment:
        k = int(torch.randint(0, 4, (1,), generator=ds.generator))
        canvas, target = torch.rot90(canvas, k, (1, 2)), torch.rot90(target, k, (0, 1))
        if bool(torch.rand(1, generator=ds.generator) < 0.5):
            canvas, target = torch.flip(canvas, (2,)), torch.flip(target, (1,))
    return {"image": canvas.contiguous(), "label": target.contiguous()}


# ---------------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("mode", ["slide", "lumps"])
def test_default_items_are_the_previous_items(feature_dir, mode):
    new = CanvasDataset(str(feature_dir), "training", canvas_size=32, canvas_mode=mode, seed=3)
    old = CanvasDataset(str(feature_dir), "training", canvas_size=32, canvas_mode=mode, seed=3)
    for i in range(12):
        a, b = new[i % len(new)], _old_getitem(old, i % len(old))
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert new.generator.get_state().equal(old.generator.get_state())  # no extra draws


def test_default_loss_is_the_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, requires_grad=True)
    target = torch.randint(-1, 2, (3, 8, 8))
    ours = CanvasCrossEntropyLoss()(logits, target)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = nn.CrossEntropyLoss(ignore_index=-1)(logits, target)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)


def test_default_configs_keep_the_paper_settings(feature_dir):
    p = _parser("train_canvas.json", feature_dir=str(feature_dir), canvas_size=32, device="$torch.device('cpu')")
    loss = p.get_parsed_content("loss")
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.weight is None and loss.nolabel_weight is None
    assert loss.ignore_index == IGNORE_INDEX
    assert p.get_parsed_content("unet_def#in_channels") == FEATURE_DIM
    ds = p.get_parsed_content("train#dataset")
    assert (ds.feature_noise, ds.cell_dropout) == (0.0, 0.0) and ds[0]["image"].shape[0] == FEATURE_DIM
    assert p.get_parsed_content("train#dataset#nolabel_targets") is False
    inf = _parser("inference.json")
    assert inf.get_parsed_content("inferer#prob_channel") is False
    assert _parser("train_e2e.json").get_parsed_content("train#trainer#prob_channel") is False


def test_rotation_flip_is_distributed_as_monai_randrotate90_randflip(tmp_path):
    """Issue 9 asks whether the dataset's rot/flip could be MONAI's: the dihedral outcome is uniform over the 8
    elements in both, so RandRotate90d(prob=0.75, max_k=3) + RandFlipd(prob=0.5, spatial_axis=1) is the same
    distribution (the dataset keeps its own generator for reproducibility, see its docstring)."""
    from monai.transforms import Compose, RandFlipd, RandRotate90d

    n = 8
    rows, cols = np.divmod(np.arange(n * n), n)
    np.savez(tmp_path / "s.npz", features=np.arange(n * n, dtype=np.float32)[:, None],
             probs=np.zeros(n * n, np.float32), rows=rows, cols=cols, labels=np.zeros(n * n, np.int64),
             grid_shape=np.asarray([n, n]), cell_size=np.float64(1), split=np.str_("training"), slide_id=np.str_("s"))
    ds = CanvasDataset(str(tmp_path), canvas_size=n, seed=0)
    base = torch.arange(n * n, dtype=torch.float32).reshape(1, n, n)
    elements = [torch.rot90(base, k, (1, 2)) for k in range(4)]
    elements += [torch.flip(e, (2,)) for e in elements]

    def which(img):
        img = img.as_tensor() if hasattr(img, "as_tensor") else img  # MONAI's MetaTensor
        return next(i for i, e in enumerate(elements) if torch.equal(img.float(), e))

    draws = 800
    ours = np.bincount([which(ds[0]["image"]) for _ in range(draws)], minlength=8) / draws
    monai = Compose([RandRotate90d(["image"], prob=0.75, max_k=3), RandFlipd(["image"], prob=0.5, spatial_axis=1)])
    monai.set_random_state(0)
    theirs = np.bincount([which(monai({"image": base.clone()})["image"]) for _ in range(draws)], minlength=8) / draws
    assert np.abs(ours - 1 / 8).max() < 0.045 and np.abs(theirs - 1 / 8).max() < 0.045


# ------------------------------------------------------------------------------------ noise and cell dropout


def test_feature_noise_has_the_slide_relative_std(feature_dir):
    sigma = 0.5
    clean = CanvasDataset(str(feature_dir), "training", canvas_size=32, augment=False, slide_ids=["a"])
    noisy = CanvasDataset(str(feature_dir), "training", canvas_size=32, augment=False, slide_ids=["a"],
                          feature_noise=sigma, prob_channel=True)
    feats = torch.from_numpy(load_feature_file(feature_dir / "a.npz")["features"])
    ref = clean[0]["image"]
    tissue = clean.items[0]["labels"].new_zeros(ref.shape[1:], dtype=torch.bool)
    lay = clean.items[0]["layout"]
    tissue[lay.rows - lay.offset[0], lay.cols - lay.offset[1]] = True
    diffs = []
    for _ in range(10):
        item = noisy[0]
        assert torch.equal(item["label"], clean[0]["label"])  # labels untouched
        assert torch.equal(item["image"][FEATURE_DIM], _prob_canvas(feature_dir / "a.npz", lay))  # prob channel clean
        d = item["image"][:FEATURE_DIM] - ref
        assert torch.equal(d[:, ~tissue], torch.zeros_like(d[:, ~tissue]))  # background stays 0
        diffs.append(d[:, tissue])
    measured = torch.cat(diffs, dim=1).std(dim=1)
    expected = sigma * feats.std(dim=0, unbiased=False)
    assert torch.allclose(measured, expected, rtol=0.08)
    # training only: validation items are clean
    val = CanvasDataset(str(feature_dir), "validation", canvas_size=32, train=False, feature_noise=sigma)
    val_clean = CanvasDataset(str(feature_dir), "validation", canvas_size=32, train=False)
    assert torch.equal(val[0]["image"], val_clean[0]["image"])


def _prob_canvas(path: Path, lay) -> torch.Tensor:
    d = load_feature_file(path)
    return scatter_to_canvas(torch.from_numpy(d["probs"])[lay.indices.long(), None], lay.rows, lay.cols, lay.size,
                             lay.offset)[0]


def test_feature_shift_is_one_affine_map_per_canvas_and_channel(feature_dir):
    """``feature_shift``: every feature channel of a training canvas is ``a x + b`` of the clean one with one ``(a,
    b)`` per canvas, ``log a`` of std ``s`` and ``b`` of std ``s`` x the slide's feature std; background and the
    probability channel stay as they were; validation items are clean."""
    s = 0.3
    clean = CanvasDataset(str(feature_dir), "training", canvas_size=32, augment=False, slide_ids=["a"])
    shifted = CanvasDataset(str(feature_dir), "training", canvas_size=32, augment=False, slide_ids=["a"],
                            feature_shift=s, prob_channel=True)
    feats = torch.from_numpy(load_feature_file(feature_dir / "a.npz")["features"]).double()
    ref = clean[0]["image"].double()
    lay = clean.items[0]["layout"]
    tissue = torch.zeros(ref.shape[1:], dtype=torch.bool)
    tissue[lay.rows - lay.offset[0], lay.cols - lay.offset[1]] = True
    log_a, b = [], []
    for _ in range(200):
        item = shifted[0]
        assert torch.equal(item["label"], clean[0]["label"])
        assert torch.equal(item["image"][FEATURE_DIM], _prob_canvas(feature_dir / "a.npz", lay))
        img = item["image"][:FEATURE_DIM].double()
        assert not bool(img[:, ~tissue].any())
        x, y = ref[:, tissue], img[:, tissue]
        slope = ((x - x.mean(1, keepdim=True)) * (y - y.mean(1, keepdim=True))).sum(1) / \
            ((x - x.mean(1, keepdim=True)) ** 2).sum(1)
        icpt = y.mean(1) - slope * x.mean(1)
        assert torch.allclose(y, slope[:, None] * x + icpt[:, None], atol=1e-4)  # exactly affine per channel
        log_a.append(slope.log())
        b.append(icpt)
    log_a, b = torch.stack(log_a), torch.stack(b)
    assert torch.allclose(log_a.std(0), torch.full((FEATURE_DIM,), s, dtype=torch.float64), rtol=0.2)
    assert torch.allclose(b.std(0), s * feats.std(0, unbiased=False), rtol=0.2)
    val = CanvasDataset(str(feature_dir), "validation", canvas_size=32, train=False, feature_shift=s)
    assert torch.equal(val[0]["image"], CanvasDataset(str(feature_dir), "validation", canvas_size=32,
                                                       train=False)[0]["image"])
    with pytest.raises(ConfigError, match="canvas_feature_shift"):
        CanvasDataset(str(feature_dir), "training", canvas_size=32, feature_shift=-1)


def test_cell_dropout_zeroes_the_right_fraction(feature_dir):
    p = 0.3
    clean = CanvasDataset(str(feature_dir), "training", canvas_size=32, augment=False, slide_ids=["a"],
                          prob_channel=True)
    drop = CanvasDataset(str(feature_dir), "training", canvas_size=32, augment=False, slide_ids=["a"],
                         cell_dropout=p, prob_channel=True)
    ref = clean[0]["image"]
    tissue = ref.abs().sum(0) > 0
    fractions = []
    for _ in range(10):
        item = drop[0]
        assert torch.equal(item["label"], clean[0]["label"])
        zeroed = (item["image"] == 0).all(0) & tissue
        kept = tissue & ~zeroed
        assert torch.equal(item["image"][:, kept], ref[:, kept])  # the other cells are untouched
        assert not bool(item["image"][:, ~tissue].any())
        fractions.append(float(zeroed.sum() / tissue.sum()))
    assert abs(np.mean(fractions) - p) < 0.03


def test_augmentation_options_are_checked(feature_dir):
    with pytest.raises(ConfigError, match="canvas_feature_noise"):
        CanvasDataset(str(feature_dir), "training", canvas_size=32, feature_noise=-0.1)
    with pytest.raises(ConfigError, match="canvas_cell_dropout"):
        CanvasDataset(str(feature_dir), "training", canvas_size=32, cell_dropout=1.0)


# ------------------------------------------------------------------------------------------------ class weights


def test_class_weights_list_and_balanced(feature_dir):
    ds = CanvasDataset(str(feature_dir), "training", canvas_size=32)
    labels = np.concatenate([load_feature_file(feature_dir / f"{s}.npz")["labels"] for s in ("a", "b")])
    counts = np.array([(labels == 0).sum(), (labels == 1).sum()])
    assert ds.class_counts().tolist() == counts.tolist()
    assert canvas_class_weights(None, ds) is None
    assert torch.equal(canvas_class_weights([1, 3]), torch.tensor([1.0, 3.0]))
    balanced = canvas_class_weights("balanced", ds)
    assert torch.allclose(balanced, torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32))
    for bad in ("inverse", [1], [1, -1], [0, 0], ["a", 1]):
        with pytest.raises(ConfigError, match="canvas_class_weights"):
            canvas_class_weights(bad, ds)


@pytest.mark.parametrize("spec", [[1.0, 3.0], "balanced"])
def test_class_weights_reach_the_loss(feature_dir, spec):
    p = _parser("train_canvas.json", feature_dir=str(feature_dir), canvas_size=32, device="$torch.device('cpu')",
                canvas_class_weights=spec)
    loss = p.get_parsed_content("loss")
    expected = canvas_class_weights(spec, p.get_parsed_content("train#dataset"))
    assert torch.equal(loss.weight, expected)
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 8, 8), torch.randint(-1, 2, (2, 8, 8))
    ce = nn.functional.cross_entropy(logits, target.clamp_min(0), reduction="none")
    w = torch.where(target >= 0, expected[target.clamp_min(0)], torch.zeros(()))
    assert torch.allclose(loss(logits, target), (w * ce).sum() / w.sum())
    assert not torch.allclose(loss(logits, target), nn.CrossEntropyLoss(ignore_index=-1)(logits, target))


# ------------------------------------------------------------------------------------------------ prob channel


def test_prob_channel_in_training_and_validation_canvases(feature_dir):
    for split, train in (("training", True), ("validation", False)):
        ds = CanvasDataset(str(feature_dir), split, canvas_size=32, train=train, augment=False, prob_channel=True)
        plain = CanvasDataset(str(feature_dir), split, canvas_size=32, train=train, augment=False)
        item, ref = ds[0], plain[0]
        assert item["image"].shape[0] == FEATURE_DIM + 1
        assert torch.equal(item["image"][:FEATURE_DIM], ref["image"])
        sid = ds.items[0]["slide_id"]
        assert torch.equal(item["image"][FEATURE_DIM], _prob_canvas(feature_dir / f"{sid}.npz", ds.items[0]["layout"]))
    # with rotations/flips the channel moves with the features
    ds = CanvasDataset(str(feature_dir), "training", canvas_size=32, prob_channel=True, slide_ids=["a"])
    probs = set(load_feature_file(feature_dir / "a.npz")["probs"].tolist())
    img = ds[0]["image"]
    tissue = img[:FEATURE_DIM].abs().sum(0) > 0
    assert set(img[FEATURE_DIM][tissue].tolist()) == probs and not bool(img[FEATURE_DIM][~tissue].any())


def test_prob_channel_needs_probs(tmp_path):
    rng = np.random.default_rng(1)
    d = _write_slide(tmp_path, "x", "training", (8, 8), 20, rng)
    np.savez(tmp_path / "x.npz", **{k: v for k, v in d.items() if k != "probs"}, grid_shape=np.asarray([8, 8]),
             cell_size=np.float64(64), split=np.str_("training"), slide_id=np.str_("x"))
    with pytest.raises(MonaiWsiExtError, match="canvas_prob_channel"):
        CanvasDataset(str(tmp_path), canvas_size=8, prob_channel=True)


def test_prob_channel_configs(feature_dir):
    p = _parser("train_canvas.json", feature_dir=str(feature_dir), canvas_size=32, device="$torch.device('cpu')",
                canvas_prob_channel=True)
    assert p.get_parsed_content("unet_def#in_channels") == FEATURE_DIM + 1
    assert p.get_parsed_content("network_def").in_channels == FEATURE_DIM + 1
    assert p.get_parsed_content("train#dataset")[0]["image"].shape[0] == FEATURE_DIM + 1
    assert p.get_parsed_content("validate#dataset")[0]["image"].shape[0] == FEATURE_DIM + 1
    inf = _parser("inference.json", canvas_prob_channel=True)
    assert inf.get_parsed_content("inferer#prob_channel") is True
    assert inf.get_parsed_content("unet_def#in_channels") == FEATURE_DIM + 1
    e2e = _parser("train_e2e.json", canvas_prob_channel=True)
    assert e2e.get_parsed_content("train#trainer#prob_channel") is True


class _TinyEncoder(nn.Module):
    """``features`` + ``head`` like :class:`PatchEncoder`, small enough for the CPU."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, FEATURE_DIM))
        self.head = nn.Linear(FEATURE_DIM, 2)
        self.feature_dim = FEATURE_DIM


class _Source:
    def __init__(self, patches: torch.Tensor):
        self.patches = patches

    def iter_batches(self, batch_size: int = 64, prefetch: int = 2):
        for s in range(0, len(self.patches), batch_size):
            yield np.arange(s, min(s + batch_size, len(self.patches))), self.patches[s:s + batch_size]


def test_inference_appends_the_head_probability_as_training_does(tmp_path):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    n, size = 150, 16
    cells = rng.choice(20 * 20, size=n, replace=False)
    rows, cols = cells // 20, cells % 20  # larger than the canvas: sliding window
    patches = torch.randn(n, 3, 4, 4)
    encoder = _TinyEncoder().eval()
    unet = UNet(2, FEATURE_DIM + 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    out = CanvasInferer(encoder, canvas_size=size, batch_size=32, channels_last=False, prob_channel=True)(
        {"patch_source": _Source(patches), "rows": rows, "cols": cols}, unet)
    with torch.no_grad():  # manual: features, head probability, canvas, U-Net, gather
        f = encoder.features(patches)
        p = torch.softmax(encoder.head(f), dim=1)[:, 1]
        (lay,) = plan_canvases(torch.from_numpy(rows), torch.from_numpy(cols), size)
        canvas = layout_canvas(torch.cat([f, p[:, None]], 1)[lay.indices], lay)
        from monai.inferers import SlidingWindowInferer

        logits = SlidingWindowInferer((size, size), sw_batch_size=4, overlap=0.25, mode="gaussian")(canvas[None], unet)
        manual = torch.empty(n)
        manual[lay.indices] = gather_from_canvas(torch.softmax(logits[0], 0), lay.rows, lay.cols, lay.offset)[:, 1]
    assert np.allclose(out["head_probs"], p.numpy(), atol=1e-6)
    assert np.allclose(out["probs"], manual.numpy(), atol=1e-5)
    assert np.array_equal(out["probs"], canvas_probabilities(unet, out["features"], rows, cols, size,
                                                             head_probs=out["head_probs"]))
    # the training canvas of the same slide (a feature file with these features and probabilities) is the same input
    np.savez(tmp_path / "s.npz", features=out["features"], probs=out["head_probs"], rows=rows, cols=cols,
             labels=np.zeros(n, np.int64), grid_shape=np.asarray([20, 20]), cell_size=np.float64(1),
             split=np.str_("test"), slide_id=np.str_("s"))
    val = CanvasDataset(str(tmp_path), canvas_size=size, train=False, prob_channel=True)
    assert torch.allclose(val[0]["image"], canvas, atol=1e-6)


def test_e2e_refuses_the_prob_channel_before_training():
    from monai_wsi_ext.engines.e2e import SurrogateE2ETrainer

    with pytest.raises(ConfigError, match="canvas_prob_channel"):
        SurrogateE2ETrainer("cpu", 1, [], nn.Identity(), nn.Identity(), None, None, prob_channel=True)


# --------------------------------------------------------------------------------------------- nolabel weighting


@pytest.fixture(scope="module")
def nolabel_data(synthetic_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic slides prepared with ``tumor_threshold=0.9`` (so that nolabel cells with tumor fractions on
    both sides of 0.5 exist) and feature files over their patch tables: ``(prepared_dir, feature_dir)``."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, load_prepared_slides, prepare_dataset

    root = tmp_path_factory.mktemp("nolabel")
    summary = prepare_dataset(collect_inputs(manifest=synthetic_dataset.manifest), root / "prepared",
                              PrepareConfig(patch_size=64, tumor_threshold=0.9), progress=False)
    assert not summary["failed"]
    feat = root / "features"
    feat.mkdir()
    rng = np.random.default_rng(3)
    for s in load_prepared_slides(root / "prepared"):
        g = s.grid
        np.savez(feat / f"{s.slide_id}.npz", features=rng.normal(size=(len(g), FEATURE_DIM)).astype(np.float32),
                 probs=rng.random(len(g)).astype(np.float32), rows=g.rows, cols=g.cols, labels=g.labels,
                 grid_shape=np.asarray(g.shape), cell_size=np.float64(g.cell_size), split=np.str_(s.split),
                 slide_id=np.str_(s.slide_id))
    return root / "prepared", feat


def test_nolabel_targets_change_only_nolabel_cells(nolabel_data):
    from monai_wsi_ext.prep.prepare import load_prepared

    prepared, feat = nolabel_data
    kw = dict(split="training", canvas_size=64, augment=False)
    plain = CanvasDataset(str(feat), **kw)
    ds = CanvasDataset(str(feat), nolabel_targets=True, prepared_dir=str(prepared), **kw)
    taken = []
    for i, item in enumerate(ds.items):
        grid = load_prepared(prepared / item["slide_id"]).grid
        lay = item["layout"]
        new, old = ds[i]["label"], plain[i]["label"]
        changed = new != old
        assert bool((old[changed] == IGNORE_INDEX).all())  # only cells the paper ignores change
        idx = lay.indices.numpy()
        nolabel = torch.from_numpy(grid.labels[idx] == PatchLabel.NOLABEL)
        r, c = lay.rows - lay.offset[0], lay.cols - lay.offset[1]
        expected = torch.from_numpy((grid.tumor[idx] >= NOLABEL_TUMOR_FRACTION).astype(np.int64))
        assert torch.equal(new[r[nolabel], c[nolabel]], nolabel_target(expected[nolabel]))
        assert torch.equal(nolabel_target(torch.tensor([0, 1])), torch.tensor([-3, -4]))
        assert torch.equal(new[r[~nolabel], c[~nolabel]], old[r[~nolabel], c[~nolabel]])
        assert int(changed.sum()) == int(nolabel.sum())  # background stays ignored
        taken.append(expected[nolabel])
    taken = torch.cat(taken)
    assert bool((taken == 1).any()) and bool((taken == 0).any())  # both sides of the 0.5 rule are exercised
    # validation canvases keep nolabel cells ignored
    val = CanvasDataset(str(feat), split="validation", canvas_size=64, train=False, nolabel_targets=True,
                        prepared_dir=str(prepared))
    val_plain = CanvasDataset(str(feat), split="validation", canvas_size=64, train=False)
    assert torch.equal(val[0]["label"], val_plain[0]["label"])


def test_nolabel_weight_in_the_loss(nolabel_data):
    prepared, feat = nolabel_data
    kw = dict(split="training", canvas_size=64, augment=False)
    target = torch.stack([CanvasDataset(str(feat), nolabel_targets=True, prepared_dir=str(prepared), **kw)[i]["label"]
                          for i in range(2)])
    plain = torch.stack([CanvasDataset(str(feat), **kw)[i]["label"] for i in range(2)])
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 64, 64, dtype=torch.float64, requires_grad=True)
    # weight 0: the paper's loss (nolabel ignored), value and gradient
    zero = CanvasCrossEntropyLoss(nolabel_weight=0.0)(logits, target)
    ref = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(logits, plain)
    assert torch.allclose(zero, ref)
    assert torch.allclose(*(torch.autograd.grad(v, logits)[0] for v in (zero, ref)))
    # weight w, with class weights: the weighted mean over labelled and nolabel cells
    w, cw = 0.25, torch.tensor([1.0, 2.0], dtype=torch.float64)
    is_nolabel = target <= NOLABEL_TARGET_BASE
    hard = torch.where(is_nolabel, NOLABEL_TARGET_BASE - target, target)
    ce = nn.functional.cross_entropy(logits, hard.clamp_min(0), reduction="none")
    weights = torch.where(hard >= 0, cw[hard.clamp_min(0)], torch.zeros((), dtype=torch.float64))
    weights = torch.where(is_nolabel, w * weights, weights)
    got = CanvasCrossEntropyLoss(weight=cw, nolabel_weight=w)(logits, target)
    assert torch.allclose(got, (weights * ce).sum() / weights.sum())
    # gradient only on cells with a loss: nolabel cells now have one, background none
    (g,) = torch.autograd.grad(CanvasCrossEntropyLoss(nolabel_weight=w)(logits, target), logits)
    has_grad = g.abs().sum(1) > 0
    assert torch.equal(has_grad, target != IGNORE_INDEX)
    with pytest.raises(ConfigError, match="canvas_nolabel_weight"):
        CanvasCrossEntropyLoss(nolabel_weight=-1)


def test_nolabel_weight_config(nolabel_data):
    prepared, feat = nolabel_data
    p = _parser("train_canvas.json", feature_dir=str(feat), dataset_dir=str(prepared), canvas_size=64,
                device="$torch.device('cpu')", canvas_nolabel_weight=0.5)
    assert p.get_parsed_content("loss").nolabel_weight == 0.5
    ds = p.get_parsed_content("train#dataset")
    assert any(bool((ds[i]["label"] <= NOLABEL_TARGET_BASE).any()) for i in range(len(ds)))
    val = p.get_parsed_content("validate#dataset")
    assert int(val[0]["label"].min()) >= IGNORE_INDEX
    with pytest.raises(ConfigError, match="prepared"):
        CanvasDataset(str(feat), "training", canvas_size=64, nolabel_targets=True)


def test_nolabel_targets_need_a_matching_patch_table(nolabel_data, tmp_path):
    prepared, feat = nolabel_data
    path = sorted(feat.glob("*.npz"))[0]
    d = dict(np.load(path))
    d["labels"] = np.where(d["labels"] == 0, 1, d["labels"])
    np.savez(tmp_path / path.name, **d)
    with pytest.raises(MonaiWsiExtError, match="does not match the patch table"):
        CanvasDataset(str(tmp_path), canvas_size=64, nolabel_targets=True, prepared_dir=str(prepared))


def test_train_canvas_runs_with_every_option(nolabel_data, tmp_path):
    """``train_canvas.json`` with all options on trains and saves a U-Net with ``feature_dim + 1`` inputs."""
    from monai.bundle import ConfigWorkflow

    prepared, feat = nolabel_data
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_canvas.json")],
                        workflow_type="train", feature_dir=str(feat), dataset_dir=str(prepared),
                        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "out"), canvas_size=32,
                        max_epochs=1, batch_size=2, device="$torch.device('cpu')", canvas_feature_noise=0.1,
                        canvas_cell_dropout=0.1, canvas_class_weights="balanced", canvas_nolabel_weight=0.5,
                        canvas_prob_channel=True)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    sd = torch.load(tmp_path / "models" / "unet.pt", weights_only=True)
    first = next(v for k, v in sd.items() if k.endswith("weight") and v.ndim == 4)
    assert first.shape[1] == FEATURE_DIM + 1


def test_canvas_label_budget_keeps_the_encoders_patches(feature_dir, tmp_path):
    """``canvas_label_fraction``: the U-Net's labels are the same stratified share of the training patches as the
    encoder's ``label_fraction`` (same fraction and seed), every other labelled cell counts as nolabel."""
    import json

    from monai_wsi_ext.data.features import budget_cells
    from monai_wsi_ext.data.patches import label_budget

    items = []
    for sid in ("a", "b"):
        d = load_feature_file(feature_dir / f"{sid}.npz")
        items += [{"slide_id": sid, "row": int(r), "col": int(c), "label": int(y)}
                  for r, c, y in zip(d["rows"], d["cols"], d["labels"]) if y >= 0]
    cells = budget_cells(items, 0.1, seed=3)
    enc = label_budget(items, 0.1, seed=3)
    assert sum(len(v) for v in cells.values()) == len(enc) and len(enc) < 0.2 * len(items)
    assert budget_cells(items, 1.0) is None
    with pytest.raises(ConfigError, match="canvas_label_fraction"):
        budget_cells(items, 1.5)
    full = CanvasDataset(str(feature_dir), "training", canvas_size=32)
    part = CanvasDataset(str(feature_dir), "training", canvas_size=32, labelled_cells=cells)
    counts = torch.bincount(torch.tensor([i["label"] for i in enc]), minlength=2)
    assert torch.equal(part.class_counts().long(), counts)  # only the budget's cells are labelled
    for it_full, it_part in zip(full.items, part.items):
        sid = it_full["slide_id"]
        lay = it_full["layout"]
        keep = {(int(r), int(c)) for r, c in cells.get(sid, ())}
        for i, (r, c) in enumerate(zip(lay.rows.tolist(), lay.cols.tolist())):
            j = int(lay.indices[i])
            want = it_full["labels"][j] if (r, c) in keep or it_full["labels"][j] < 0 else PatchLabel.NOLABEL
            assert int(it_part["labels"][j]) == int(want)
    # the config builds the budget from the prepared datalist with the run's seed
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "datalist.json").write_text(json.dumps({"training": items, "validation": []}))
    parser = _parser("train_canvas.json", feature_dir=str(feature_dir), dataset_dir=str(prepared), seed=3,
                     canvas_label_fraction=0.1)
    ds = parser.get_parsed_content("train#dataset")
    assert torch.equal(ds.class_counts().long(), counts)
    parser = _parser("train_canvas.json", feature_dir=str(feature_dir), dataset_dir=str(prepared))
    assert torch.equal(parser.get_parsed_content("train#dataset").class_counts(), full.class_counts())
