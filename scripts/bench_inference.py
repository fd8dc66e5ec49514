"""Inference speed benchmarks on the CPU: encoder throughput and the whole slide-inference path.

Two measurements, both printed as Markdown tables (and written to ``BENCHMARKS.md`` with ``--write_md``):

(a) encoder throughput: patches/s of the patch encoder's ``features`` + ``head`` at ``image_size`` px for every
    combination of memory format (NCHW, channels_last), batch size and grad mode (``torch.no_grad``,
    ``torch.inference_mode``), each relative to the NCHW / no_grad / largest-batch cell of the same backbone.
(b) slide inference: a generated slide is prepared (tissue + patch grid, not timed), then
    :class:`monai_wsi_ext.inference.slides.SlideInference` is timed over it (patch reading with the prefetch thread,
    the encoder, the canvas U-Net, all output files), against "encoder-only compute": the same encoder forward over
    the same number of patches already in memory (same batch size, channels_last, inference_mode). Also timed:
    reading + transforming the patches alone (``SlidePatchSource.iter_batches`` without the encoder), to see how much
    of the reading the prefetch thread hides.

Usage::

    python scripts/bench_inference.py run --write_md BENCHMARKS.md
    python scripts/bench_inference.py run --quick
    python scripts/bench_inference.py run --densenet --skip_slide

Timings on a shared machine are noisy: every cell is the best of ``repeats`` rounds, and the load average before and
after the run is recorded with the tables.

OpenMP wait policy: unless ``OMP_WAIT_POLICY`` is already set, the script sets it to ``PASSIVE`` before torch is
imported. On a machine whose cores are shared with other busy processes, torch's OpenMP threads spin-wait at every
parallel region for a partner thread that is not scheduled; on the busy 2-core development machine an ad-hoc loop
(GoogLeNet forward at 64 px) ran about 10x slower with 2 threads than with 1, while with ``PASSIVE`` 2 threads ran as
fast as 1. The policy in effect is recorded with the results; set ``OMP_WAIT_POLICY=ACTIVE`` to measure the default
behaviour.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from monai_wsi_ext.testing.bench import passive_omp_policy  # noqa: E402 - no torch import behind it

OMP_POLICY = passive_omp_policy()  # before torch loads its OpenMP runtime; see the docstring

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from monai_wsi_ext.utils import setup_logging  # noqa: E402
from monai_wsi_ext.testing.bench import cached_synthetic_slide, publish, replace_section  # noqa: E402

__all__ = [
    "MARKER",
    "UNET_CONFIG",
    "canvas_unet",
    "encoder_rates",
    "encoder_table",
    "slide_benchmark",
    "slide_table",
    "replace_section",
    "benchmark",
    "markdown",
    "run",
]

UNET_CONFIG = REPO_ROOT / "bundle" / "configs" / "common.json"
"""The bundle config that defines the canvas U-Net (``unet_def``): the benchmarks measure the bundle's U-Net."""


def canvas_unet(feature_dim: int):
    """The bundle's canvas U-Net (``common.json#unet_def``) for a ``feature_dim``-channel canvas."""
    from monai_wsi_ext.model.networks import bundle_unet

    return bundle_unet(UNET_CONFIG, feature_dim=int(feature_dim))


logger = logging.getLogger("bench_inference")

MARKER = "bench_inference"
FORMATS = ("nchw", "channels_last")
GRAD_MODES = ("no_grad", "inference_mode")


def _grad_context(mode: str):
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference_mode":
        return torch.inference_mode()
    raise ValueError(f"grad mode must be one of {GRAD_MODES}, got {mode!r}.")


def _memory_format(fmt: str) -> torch.memory_format:
    if fmt == "nchw":
        return torch.contiguous_format
    if fmt == "channels_last":
        return torch.channels_last
    raise ValueError(f"memory format must be one of {FORMATS}, got {fmt!r}.")


def _forward(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What slide inference runs per batch: the features and the head's tumor probability."""
    f = encoder.features(x)
    return torch.softmax(encoder.head(f).float(), dim=1)[:, 1]


def encoder_rates(
    backbone: str = "googlenet",
    batch_sizes: Sequence[int] = (16, 32, 64),
    image_size: int = 224,
    patches_per_cell: int = 192,
    repeats: int = 2,
    formats: Sequence[str] = FORMATS,
    grad_modes: Sequence[str] = GRAD_MODES,
) -> list[dict]:
    """Encoder throughput for every (memory format, batch size, grad mode) cell.

    Each cell encodes ``patches_per_cell`` patches (rounded up to whole batches) of random pixels after one warm-up
    batch; the rounds run over all cells in turn ``repeats`` times and each cell keeps its best round, so a burst of
    load from other processes hits every cell alike rather than one cell.

    Args:
        backbone: ``googlenet`` or ``densenet121``.
        batch_sizes: batch sizes to try.
        image_size: patch side in pixels.
        patches_per_cell: patches encoded per cell and round.
        repeats: rounds.
        formats: memory formats (``nchw``, ``channels_last``).
        grad_modes: ``no_grad`` and/or ``inference_mode``.

    Returns:
        One dict per cell: ``backbone``, ``format``, ``batch_size``, ``grad_mode``, ``patches``, ``seconds`` (best
        round), ``rate`` (patches/s) and ``rounds`` (patches/s of every round).
    """
    from monai_wsi_ext.model.networks import PatchEncoder

    torch.manual_seed(0)
    encoder = PatchEncoder(backbone).eval()
    cells = [(f, int(b), m) for f in formats for b in batch_sizes for m in grad_modes]
    rounds: dict[tuple, list[float]] = {c: [] for c in cells}
    seconds: dict[tuple, float] = {}
    inputs = {}
    for fmt in formats:
        mf = _memory_format(fmt)
        for b in batch_sizes:
            inputs[fmt, int(b)] = torch.rand(int(b), 3, image_size, image_size).contiguous(memory_format=mf)
    for _ in range(max(int(repeats), 1)):
        for fmt, b, mode in cells:
            encoder.to(memory_format=_memory_format(fmt))
            x = inputs[fmt, b]
            n_batches = max(1, -(-int(patches_per_cell) // b))
            with _grad_context(mode):
                _forward(encoder, x)  # warm-up: oneDNN primitives for this shape/format
                t0 = time.perf_counter()
                for _ in range(n_batches):
                    _forward(encoder, x)
                dt = time.perf_counter() - t0
            rounds[fmt, b, mode].append(n_batches * b / dt)
            seconds[fmt, b, mode] = min(seconds.get((fmt, b, mode), float("inf")), dt)
            logger.info("%s %s batch %d %s: %.1f patches/s", backbone, fmt, b, mode, n_batches * b / dt)
    out = []
    for fmt, b, mode in cells:
        n = max(1, -(-int(patches_per_cell) // b)) * b
        out.append({"backbone": backbone, "format": fmt, "batch_size": b, "grad_mode": mode, "patches": n,
                    "seconds": round(seconds[fmt, b, mode], 4), "rate": round(max(rounds[fmt, b, mode]), 2),
                    "rounds": [round(r, 2) for r in rounds[fmt, b, mode]]})
    return out


def encoder_table(cells: list[dict]) -> str:
    """Markdown table of :func:`encoder_rates` cells: rows (backbone, batch, grad mode), columns memory formats;
    each cell ``rate (ratio x)`` against the NCHW / no_grad / largest-batch cell of its backbone."""
    lines = ["| backbone | batch | grad mode | " + " | ".join(f"{f} patches/s (vs baseline)" for f in FORMATS) + " |",
             "|---|---:|---|" + "---:|" * len(FORMATS)]
    for backbone in dict.fromkeys(c["backbone"] for c in cells):
        mine = [c for c in cells if c["backbone"] == backbone]
        big = max(c["batch_size"] for c in mine)
        base = next((c["rate"] for c in mine if c["format"] == "nchw" and c["grad_mode"] == "no_grad"
                     and c["batch_size"] == big), None)
        for b in sorted({c["batch_size"] for c in mine}):
            for mode in GRAD_MODES:
                row = []
                for fmt in FORMATS:
                    c = next((c for c in mine if (c["format"], c["batch_size"], c["grad_mode"]) == (fmt, b, mode)),
                             None)
                    if c is None:
                        row.append("-")
                    elif base:
                        mark = " **baseline**" if (fmt, b, mode) == ("nchw", big, "no_grad") else ""
                        row.append(f"{c['rate']:.1f} ({c['rate'] / base:.2f}x){mark}")
                    else:
                        row.append(f"{c['rate']:.1f}")
                if any(r != "-" for r in row):
                    lines.append(f"| {backbone} | {b} | {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _time_encoder_only(encoder: torch.nn.Module, patches: torch.Tensor, batch_size: int) -> float:
    x = patches.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for start in range(0, x.shape[0], batch_size):
            _forward(encoder, x[start:start + batch_size])
        return time.perf_counter() - t0


def _time_reading(source, batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for _, batch in source.iter_batches(batch_size):
        n += batch.shape[0]
    return time.perf_counter() - t0, n


def slide_benchmark(
    work_dir: str | os.PathLike,
    backbone: str = "googlenet",
    slide_size: int = 8192,
    patch_size: int = 256,
    crop_size: int | None = 224,
    n_lumps: int = 8,
    seed: int = 7,
    batch_size: int = 64,
    repeats: int = 2,
    backend: str = "auto",
) -> dict:
    """Time slide inference against encoder-only compute on the same number of patches.

    The slide is generated and prepared before any timing. Then, ``repeats`` times in turn: ``SlideInference.run()``
    over the prepared slide (a fresh output folder each time), encoder-only compute over the slide's patches held in
    memory, and reading alone. Each keeps its best round.

    Args:
        work_dir: folder for the slide, the prepared grid and the outputs (the slide is reused between runs).
        backbone: encoder backbone.
        slide_size: side of the square synthetic slide in pixels.
        patch_size: patch grid cell in pixels (read size).
        crop_size: centre crop fed to the encoder.
        n_lumps: tissue lumps of the synthetic slide.
        seed: slide seed.
        batch_size: patches per encoder call (both paths).
        repeats: rounds.
        backend: slide reader backend.

    Returns:
        dict with ``n_patches``, ``grid_shape``, ``canvas_size``, ``backend``, the best ``slide_s``, ``encoder_s``,
        ``read_s``, per-slide ``slide_inner_s`` (as SlideInference reports it), every round, and ``ratio``
        (``slide_s / encoder_s``).
    """
    from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.model.networks import PatchEncoder
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, prepare_dataset
    from monai_wsi_ext.inference.slides import SlideInference

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    slide = cached_synthetic_slide(work, slide_size, patch_size, seed, n_lumps)
    prepared = work / f"prepared_{slide.stem}"
    summary = prepare_dataset([SlideInput(str(slide), annotation=str(slide.with_suffix(".xml")), slide_id="bench")],
                              prepared, PrepareConfig(patch_size=patch_size, backend=backend), progress=False)
    if summary["failed"]:
        raise RuntimeError(f"preparing {slide} failed: {summary['failed']}")
    meta = load_prepared_slides(prepared)[0]
    grid = meta.grid
    n = len(grid)
    canvas_size = -(-max(grid.shape) // 16) * 16

    torch.manual_seed(0)
    encoder = PatchEncoder(backbone).eval()
    unet = canvas_unet(encoder.feature_dim).eval()
    transform = make_patch_transform(False, crop_size)
    source = SlidePatchSource.from_prepared(meta, transform, backend)
    patches = source.load(np.arange(n))  # in memory for the encoder-only path (loading not timed)
    used_backend = source.slide.backend
    source.close()

    rounds: dict[str, list[float]] = {"slide": [], "slide_inner": [], "encoder": [], "read": []}
    for r in range(max(int(repeats), 1)):
        out_dir = work / f"inference_round{r}"
        inf = SlideInference(str(out_dir), encoder, unet, prepared_dir=str(prepared), canvas_size=canvas_size,
                             device="cpu", batch_size=batch_size, crop_size=crop_size, backend=backend,
                             channels_last=True)
        t0 = time.perf_counter()
        result = inf.run()
        rounds["slide"].append(time.perf_counter() - t0)
        rounds["slide_inner"].append(float(result["slides"]["bench"]["seconds"]))
        encoder.to(memory_format=torch.channels_last)
        rounds["encoder"].append(_time_encoder_only(encoder, patches, batch_size))
        src = SlidePatchSource.from_prepared(meta, transform, backend)
        dt, got = _time_reading(src, batch_size)
        src.close()
        if got != n:
            raise RuntimeError(f"reading returned {got} patches, expected {n}")
        rounds["read"].append(dt)
        logger.info("round %d: slide %.2f s, encoder-only %.2f s, reading %.2f s", r, rounds["slide"][-1],
                    rounds["encoder"][-1], rounds["read"][-1])
    best = {k: min(v) for k, v in rounds.items()}
    return {"n_patches": n, "grid_shape": list(grid.shape), "canvas_size": canvas_size, "backend": used_backend,
            "slide_size": slide_size, "patch_size": patch_size, "crop_size": crop_size, "batch_size": batch_size,
            "backbone": backbone, "slide_s": round(best["slide"], 3), "slide_inner_s": round(best["slide_inner"], 3),
            "encoder_s": round(best["encoder"], 3), "read_s": round(best["read"], 3),
            "ratio": round(best["slide"] / best["encoder"], 3),
            "rounds": {k: [round(x, 3) for x in v] for k, v in rounds.items()}}


def slide_table(res: dict) -> str:
    """Markdown table of :func:`slide_benchmark`."""
    n = res["n_patches"]
    rows = [
        ("slide inference, `SlideInference.run()` (read + encode + U-Net + outputs)", res["slide_s"]),
        ("of which the per-slide part SlideInference reports", res["slide_inner_s"]),
        ("encoder-only compute, patches in memory", res["encoder_s"]),
        ("reading + transform alone (`iter_batches`, no encoder)", res["read_s"]),
    ]
    lines = ["| path | seconds | patches/s | vs encoder-only |", "|---|---:|---:|---:|"]
    for name, s in rows:
        lines.append(f"| {name} | {s:.2f} | {n / s:.1f} | {s / res['encoder_s']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- runtimes vs the MONAI peer

COMPARE_CONFIGS = (("torch", "fp32", 64), ("torch", "fp32", 16), ("onnxruntime", "fp32", 16),
                   ("openvino", "fp32", 16), ("onnxruntime", "int8", 16), ("openvino", "int8", 16))
"""(runtime, precision, batch) of the project's slide inference in :func:`compare_benchmark`; the first is the
project's default before the runtimes (batch 64, eager torch)."""


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 5 ms from /proc/self/statm)."""

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.005)

    def __enter__(self):
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def input_sensitive_encoder(backbone: str = "googlenet", patches: torch.Tensor | None = None):
    """A random encoder whose features depend on the input (He-initialised convolutions, batch-norm statistics from
    ``patches``): torchvision's initialisation gives nearly the same features for every patch, which would make
    differences between runtimes look smaller than they are. Speed does not depend on the weights."""
    from monai_wsi_ext.model.networks import PatchEncoder

    torch.manual_seed(0)
    enc = PatchEncoder(backbone)
    for m in enc.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    if patches is not None:
        enc.train()
        with torch.no_grad():
            enc(patches)
    return enc.eval()


def peer_inference(slide: str | os.PathLike, encoder: torch.nn.Module, patch_size: int, crop_size: int | None,
                   batch_size: int, background: float = 220.0) -> torch.Tensor:
    """What a user writes with MONAI alone: ``PatchInferer`` + ``WSISlidingWindowSplitter(reader="cuCIM")`` over
    every cell of the slide, background cells dropped after their read (mean RGB above ``background``), the centre
    crop and [0, 1] scaling, the same encoder in channels_last, the head's tumor probability merged onto the cell
    grid (``AvgMerger``). Nothing is written. Returns the (1, 1, rows, cols) probability map."""
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter
    from monai.inferers.merger import AvgMerger

    def is_tissue(patch, location) -> bool:
        return float(patch.float().mean()) < background

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        if crop_size is not None:
            top = (x.shape[-1] - crop_size) // 2
            x = x[..., top:top + crop_size, top:top + crop_size]
        return (x.float() / 255.0).contiguous(memory_format=torch.channels_last)

    def network(x: torch.Tensor) -> torch.Tensor:
        return _forward(encoder, x).reshape(-1, 1, 1, 1)

    splitter = WSISlidingWindowSplitter(patch_size, filter_fn=is_tissue, reader="cuCIM")
    inferer = PatchInferer(splitter, merger_cls=AvgMerger, batch_size=batch_size, preprocessing=preprocess,
                           match_spatial_shape=False)
    encoder.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return inferer(str(slide), network)


def _prepare_bench_dataset(work: Path, slide_sizes: Sequence[int], patch_size: int, backend: str) -> dict:
    """Synthetic slides for the comparison (one per size) and a calibration slide and a held-out slide of another
    seed, prepared (not timed)."""
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, prepare_dataset

    slides = {int(sz): cached_synthetic_slide(work, int(sz), patch_size, 7, max(2, int(sz) // 1024))
              for sz in slide_sizes}
    side = min(4096, max(int(sz) for sz in slide_sizes))
    calib = cached_synthetic_slide(work, side, patch_size, 11, 4)
    held = cached_synthetic_slide(work, side, patch_size, 13, 4)
    prepared = work / "prepared_compare"
    inputs = [SlideInput(str(calib), annotation=str(calib.with_suffix(".xml")), slide_id="calib", split="training"),
              SlideInput(str(held), annotation=str(held.with_suffix(".xml")), slide_id="heldout", split="validation")]
    inputs += [SlideInput(str(p), annotation=str(p.with_suffix(".xml")), slide_id=f"size{sz}", split="test")
               for sz, p in slides.items()]
    summary = prepare_dataset(inputs, prepared, PrepareConfig(patch_size=patch_size, backend=backend), progress=False)
    if summary["failed"]:
        raise RuntimeError(f"preparing the benchmark slides failed: {summary['failed']}")
    return {"slides": slides, "prepared": prepared}


def _export_models(work: Path, encoder, unet, crop_size: int, prepared: Path, n_calib: int) -> dict:
    """fp32 ONNX models of the benchmark's networks and an int8 encoder calibrated on the calibration slide (its
    report measured on the held-out slide)."""
    from monai_wsi_ext.runtime.int8 import calibrate_int8
    from monai_wsi_ext.runtime.onnx import export_onnx

    models = work / "onnx_models"
    models.mkdir(parents=True, exist_ok=True)
    settings = {"crop_size": crop_size, "canvas_size": 32, "feature_dim": encoder.feature_dim}
    t0 = time.perf_counter()
    export_onnx(encoder, "encoder", models / "encoder.onnx", example=torch.rand(2, 3, crop_size, crop_size),
                settings=settings)
    export_onnx(unet, "unet", models / "unet.onnx", settings=settings)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = calibrate_int8(models, prepared, "training", "validation", n_patches=n_calib, batch_size=16)
    return {"dir": models, "export_s": round(export_s, 1), "calibrate_s": round(time.perf_counter() - t0, 1),
            "int8_report": {k: report[k] for k in ("max_abs_prob_change", "mean_abs_prob_change",
                                                   "fraction_calls_changed", "calls_changed", "pr_auc_fp32",
                                                   "pr_auc_int8", "max_abs_feature_change", "max_abs_feature_fp32")}
            | {"heldout_patches": report["heldout"]["n_patches"], "n_calibration": report["calibration"]["n_patches"]}}


def _project_networks(runtime: str, precision: str, encoder, unet, models: Path):
    from monai_wsi_ext.runtime import RuntimeNetwork

    if runtime == "torch":
        return encoder, unet
    enc_file = models / ("encoder.int8.onnx" if precision == "int8" else "encoder.onnx")
    return (RuntimeNetwork(None, "encoder", runtime, precision, enc_file),
            RuntimeNetwork(None, "unet", runtime, "fp32", models / "unet.onnx"))


def _encoder_only(net, patches: torch.Tensor, batch_size: int, channels_last: bool) -> float:
    from monai_wsi_ext.model.predict import encode_batches

    x = patches.contiguous(memory_format=torch.channels_last) if channels_last else patches
    t0 = time.perf_counter()
    with torch.inference_mode():
        encode_batches(net, (x[i:i + batch_size] for i in range(0, len(x), batch_size)), channels_last=channels_last,
                       with_probs=True)
    return time.perf_counter() - t0


def compare_benchmark(work_dir: str | os.PathLike, slide_sizes: Sequence[int] = (4096, 8192, 12288),
                      main_size: int = 8192, patch_size: int = 256, crop_size: int = 224, repeats: int = 3,
                      configs: Sequence[tuple] = COMPARE_CONFIGS, n_calib: int = 64, backend: str = "cucim") -> dict:
    """The project's slide inference on every installed runtime and precision against the MONAI peer
    (:func:`peer_inference`), same slide, encoder and thread count, in interleaved rounds (every configuration once
    per round, so a burst of load hits all alike; each keeps its best round).

    At ``main_size``: every configuration of ``configs`` whose runtime is installed, the peer, and each
    configuration's encoder-only compute over the same patches in memory; at every size of ``slide_sizes``: the
    peer and the fastest fp32 and int8 configurations (per-patch cost). The project's run starts from the slide
    file (tissue detection and the patch grid in memory are timed, as the peer's splitting is) and writes every
    output; its probability map is compared with eager torch fp32 (max |difference|).
    """
    from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform
    from monai_wsi_ext.inference.slides import SlideInference
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.runtime import runtime_available

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted({int(s) for s in slide_sizes} | {int(main_size)})
    data = _prepare_bench_dataset(work, sizes, patch_size, backend)
    prepared = {p.slide_id: p for p in load_prepared_slides(data["prepared"])}
    transform = make_patch_transform(False, crop_size)
    src = SlidePatchSource.from_prepared(prepared["calib"], transform, backend)
    bn_patches = src.load(np.arange(min(64, len(src))))
    src.close()
    encoder = input_sensitive_encoder("googlenet", bn_patches)
    torch.manual_seed(1)
    unet = canvas_unet(encoder.feature_dim).eval()
    configs = [tuple(c) for c in configs if runtime_available(c[0])]
    has_onnx = any(c[0] != "torch" for c in configs)
    models = _export_models(work, encoder, unet, crop_size, data["prepared"], n_calib) if has_onnx else None
    main = prepared[f"size{main_size}"]
    src = SlidePatchSource.from_prepared(main, transform, backend)
    patches = src.load(np.arange(len(src)))
    src.close()

    def project(cfg, size, out_dir):
        runtime, precision, batch = cfg
        enc, un = _project_networks(runtime, precision, encoder, unet, models["dir"] if models else None)
        grid = prepared[f"size{size}"].grid
        canvas = -(-max(grid.shape) // 16) * 16
        inf = SlideInference(str(out_dir), enc, un, slides=str(data["slides"][size]),
                             prepare={"patch_size": patch_size}, canvas_size=canvas, device="cpu",
                             batch_size=batch, crop_size=crop_size, backend=backend, channels_last=True)
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            inf.run()
            dt = time.perf_counter() - t0
        prob = np.load(next(Path(out_dir).glob("*/*_prob.npy")))
        return dt, rss.peak, prob

    def peer(size, batch=16):
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            out = peer_inference(data["slides"][size], encoder, patch_size, crop_size, batch)
            dt = time.perf_counter() - t0
        return dt, rss.peak, int(out.numel())

    key = lambda c: f"{c[0]}/{c[1]}/b{c[2]}"  # noqa: E731
    times: dict[str, list[float]] = {k: [] for k in ["peer", *(key(c) for c in configs),
                                                     *(f"encoder-only {key(c)}" for c in configs)]}
    rss: dict[str, int] = {}
    probs: dict[str, np.ndarray] = {}
    for r in range(max(int(repeats), 1)):
        dt, peak, _ = peer(main_size)
        times["peer"].append(dt)
        rss["peer"] = max(rss.get("peer", 0), peak)
        for c in configs:
            dt, peak, prob = project(c, main_size, work / f"out_{r}_{key(c).replace('/', '_')}")
            times[key(c)].append(dt)
            rss[key(c)] = max(rss.get(key(c), 0), peak)
            probs[key(c)] = prob
            enc, _ = _project_networks(c[0], c[1], encoder, unet, models["dir"] if models else None)
            times[f"encoder-only {key(c)}"].append(_encoder_only(enc, patches, c[2], c[0] == "torch"))
        logger.info("round %d: %s", r, {k: round(v[-1], 2) for k, v in times.items()})
    best = {k: min(v) for k, v in times.items()}
    ref = probs[key(configs[0])]
    tissue = np.isfinite(ref)
    rows = []
    for c in configs:
        k = key(c)
        rows.append({"config": k, "runtime": c[0], "precision": c[1], "batch_size": c[2], "slide_s": round(best[k], 3),
                     "encoder_s": round(best[f"encoder-only {k}"], 3),
                     "slide_vs_encoder": round(best[k] / best[f"encoder-only {k}"], 3),
                     "vs_peer": round(best["peer"] / best[k], 3),
                     "vs_default": round(best[key(configs[0])] / best[k], 3),
                     "max_abs_prob_diff": float(np.abs(probs[k][tissue] - ref[tissue]).max()),
                     "calls_changed": int(np.sum((probs[k][tissue] > 0.5) != (ref[tissue] > 0.5))),
                     "peak_rss_mb": round(rss[k] / 2**20), "rounds": [round(x, 3) for x in times[k]]})
    fp32 = [r for r in rows if r["precision"] == "fp32" and r["runtime"] != "torch"] or [rows[0]]
    int8 = [r for r in rows if r["precision"] == "int8"]
    picks = [min(fp32, key=lambda r: r["slide_s"])] + ([min(int8, key=lambda r: r["slide_s"])] if int8 else [])
    scaling = []
    for size in sizes:
        n = len(prepared[f"size{size}"].grid)
        entry = {"slide_size": size, "n_patches": n}
        peer_t = [peer(size)[0] for _ in range(2)]
        entry["peer_ms_per_patch"] = round(1000 * min(peer_t) / n, 2)
        for pk in picks:
            c = (pk["runtime"], pk["precision"], pk["batch_size"])
            t = [project(c, size, work / f"scale_{size}_{i}_{key(c).replace('/', '_')}")[0] for i in range(2)]
            entry[f"{pk['config']} ms_per_patch"] = round(1000 * min(t) / n, 2)
        scaling.append(entry)
        logger.info("size %d: %s", size, entry)
    grid = main.grid
    return {"slide_size": main_size, "n_patches": len(grid), "n_cells": int(grid.shape[0] * grid.shape[1]),
            "patch_size": patch_size, "crop_size": crop_size, "backend": backend, "repeats": repeats,
            "peer_s": round(best["peer"], 3), "peer_rounds": [round(x, 3) for x in times["peer"]],
            "peer_peak_rss_mb": round(rss["peer"] / 2**20), "rows": rows, "scaling": scaling,
            "export": None if models is None else {k: v for k, v in models.items() if k != "dir"}}


def compare_table(res: dict) -> str:
    """Markdown tables of :func:`compare_benchmark`."""
    lines = ["| project configuration (runtime / precision / batch) | slide s | **vs MONAI peer** | vs project default "
             "(torch, batch 64) | slide / encoder-only | max abs prob diff vs torch fp32 | calls changed at 0.5 | "
             "peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['slide_s']:.2f} | **{r['vs_peer']:.2f}x** | {r['vs_default']:.2f}x | "
                     f"{r['slide_vs_encoder']:.2f}x | {r['max_abs_prob_diff']:.2g} | {r['calls_changed']} | "
                     f"{r['peak_rss_mb']} |")
    lines.append(f"| MONAI peer (`PatchInferer` + `WSISlidingWindowSplitter`, torch, batch 16) | {res['peer_s']:.2f} | "
                 f"1.00x | - | - | - | - | {res['peer_peak_rss_mb']} |")
    return "\n".join(lines)


def scaling_table(res: dict) -> str:
    """Markdown table of the per-patch cost of :func:`compare_benchmark` at each slide size."""
    cols = [k for k in res["scaling"][0] if k.endswith("ms_per_patch")]
    names = ["MONAI peer" if c == "peer_ms_per_patch" else c.replace(" ms_per_patch", "") for c in cols]
    lines = ["| slide px | tissue patches | " + " | ".join(f"{n} ms/patch" for n in names) + " |",
             "|---:|---:|" + "---:|" * len(cols)]
    for e in res["scaling"]:
        lines.append(f"| {e['slide_size']} | {e['n_patches']} | " + " | ".join(f"{e[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
            "omp_wait_policy": OMP_POLICY}


def benchmark(quick: bool = False, densenet: bool = False, batch_sizes: Sequence[int] = (16, 32, 64),
              image_size: int = 224, patches_per_cell: int = 192, repeats: int = 2, threads: int = 2,
              skip_encoder: bool = False, skip_slide: bool = False, slide_size: int = 8192, patch_size: int = 256,
              crop_size: int = 224, work_dir: str | None = None, backend: str = "auto", compare: bool = True,
              compare_sizes: Sequence[int] = (4096, 8192, 12288), compare_repeats: int = 3) -> dict:
    """Run the benchmarks and return their results (see :func:`run` for the arguments)."""
    compare_main, n_calib = slide_size, 64
    if quick:
        batch_sizes, image_size, patches_per_cell, repeats = (2, 4), 32, 4, 1
        slide_size, patch_size, crop_size = 768, 64, 32
        compare_sizes, compare_main, compare_repeats, n_calib = (1024,), 1024, 1, 8
    torch.set_num_threads(int(threads))
    res: dict = {"machine": _machine(), "quick": bool(quick), "loadavg_before": [round(v, 2) for v in os.getloadavg()],
                 "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "encoder": [],
                 "settings": {"batch_sizes": list(batch_sizes), "image_size": image_size,
                              "patches_per_cell": patches_per_cell, "repeats": repeats}}
    t0 = time.perf_counter()
    if not skip_encoder:
        for backbone in ("googlenet", "densenet121") if densenet else ("googlenet",):
            res["encoder"] += encoder_rates(backbone, batch_sizes, image_size, patches_per_cell, repeats)
    if not skip_slide:
        work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "monai_wsi_bench"
        res["slide"] = slide_benchmark(work, "googlenet", slide_size, patch_size, crop_size,
                                       n_lumps=8 if not quick else 2, batch_size=max(batch_sizes), repeats=repeats,
                                       backend=backend)
    if compare:
        work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "monai_wsi_bench"
        res["compare"] = compare_benchmark(work / "compare", compare_sizes, compare_main, patch_size, crop_size,
                                           compare_repeats, n_calib=n_calib,
                                           backend="cucim" if backend == "auto" else backend)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return res


def markdown(res: dict, command: str) -> str:
    """The ``BENCHMARKS.md`` section of a :func:`benchmark` result."""
    m = res["machine"]
    s = res["settings"]
    out = ["## Inference speed (CPU)", "",
           f"Command: `{command}`  ",
           f"Date: {res['date']}; {m['cpus']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
           f"Python {m['python']}, `OMP_WAIT_POLICY={m['omp_wait_policy']}`; wall time {res['wall_s']} s; "
           f"load average (1/5/15 min) {res['loadavg_before']} before, {res['loadavg_after']} after."]
    if res["quick"]:
        out += ["", "**Quick smoke run (tiny sizes): the numbers say nothing about speed.**"]
    out += ["", "Timings are noisy when other jobs share the machine (a load average above the CPU count means another "
            "process competed for the cores); each value is the best of "
            f"{s['repeats']} round(s) taken in turn, so competing load hits all cells alike, but ratios between cells "
            "can still move by 10-20 % from run to run."]
    if res["encoder"]:
        out += ["", f"### Encoder throughput, {s['image_size']} px, random pixels, `features` + `head`", "",
                f"{s['patches_per_cell']} patches per cell and round (whole batches); ratio against the NCHW / "
                "`torch.no_grad` / largest-batch cell of the same backbone.", "", encoder_table(res["encoder"])]
    sl = res.get("slide")
    if sl:
        out += ["", "### Slide inference vs encoder-only compute", "",
                f"Synthetic slide {sl['slide_size']} x {sl['slide_size']} px, {sl['n_patches']} tissue patches of "
                f"{sl['patch_size']} px (grid {sl['grid_shape'][0]} x {sl['grid_shape'][1]}, centre crop "
                f"{sl['crop_size']}), reader `{sl['backend']}`, {sl['backbone']} encoder, batch {sl['batch_size']}, "
                f"channels_last, `torch.inference_mode`, U-Net canvas {sl['canvas_size']}. Tissue detection and the "
                "patch grid are prepared before timing. `SlideInference.run()` includes reading with the prefetch "
                "thread, the encoder, the canvas U-Net and writing every output (npy/PNG maps, pyramidal heatmap "
                "TIFF, overlay, GeoJSON, record); encoder-only compute runs the same forward on the same number of "
                "patches already in memory.", "", slide_table(sl), "",
                f"**Slide inference / encoder-only = {sl['ratio']:.2f}x** (goal <= 1.2x). Rounds (s): slide "
                f"{sl['rounds']['slide']}, encoder-only {sl['rounds']['encoder']}, reading {sl['rounds']['read']}."]
    cm = res.get("compare")
    if cm:
        ex = cm.get("export") or {}
        out += ["", "### The project's runtimes against MONAI's own patch inference", "",
                f"Synthetic slide {cm['slide_size']} x {cm['slide_size']} px: {cm['n_cells']} cells of "
                f"{cm['patch_size']} px, {cm['n_patches']} of them tissue; centre crop {cm['crop_size']}, GoogLeNet "
                "encoder (random He-initialised weights with batch-norm statistics from real patches, so that "
                f"outputs differ per patch), reader `{cm['backend']}`, {m['torch_threads']} threads everywhere, "
                f"{cm['repeats']} interleaved rounds (every configuration once per round), best round kept.", "",
                "What differs in the work done: the **peer** (`monai.inferers.PatchInferer` + "
                "`WSISlidingWindowSplitter(reader=\"cuCIM\")`, the same encoder in channels_last, batch 16) reads "
                "**every** cell and drops background after the read (mean RGB > 220), runs the encoder and its "
                "head and merges the head's probabilities onto the grid; it writes nothing. The **project** "
                "(`SlideInference.run()` from the slide file) detects tissue on the thumbnail, lays the grid, reads "
                "**only tissue cells**, runs the encoder, the canvas U-Net over the features and **writes every "
                "output** (npy/PNG maps, pyramidal heatmap TIFF, overlay, GeoJSON, record). Encoder-only compute: "
                "the same runtime network over the slide's patches already in memory (`encode_batches`, same "
                "batch). ONNX models: exported once with the dynamo exporter "
                f"({ex.get('export_s', '-')} s, not timed); int8: static QDQ calibrated on "
                f"{(ex.get('int8_report') or {}).get('n_calibration', '-')} patches of another slide "
                f"({ex.get('calibrate_s', '-')} s, not timed).", "", compare_table(cm)]
        rep = ex.get("int8_report")
        if rep:
            out += ["", f"int8 calibration report on the held-out slide ({rep['heldout_patches']} patches; "
                    "untrained networks, so this says little about a trained model's quality, see "
                    "bundle/docs/runtimes.md for the demo's): max |dp| "
                    f"{rep['max_abs_prob_change']:.3g}, mean |dp| {rep['mean_abs_prob_change']:.3g}, calls changed "
                    f"{rep['calls_changed']} ({rep['fraction_calls_changed']:.2%})."]
        out += ["", "Per-patch cost (ms per tissue patch, best of 2 rounds) at each slide size; the peer's "
                "includes reading the background cells.", "", scaling_table(cm)]
    return "\n".join(out)


def run(quick: bool = False, densenet: bool = False, batch_sizes: Sequence[int] = (16, 32, 64), image_size: int = 224,
        patches_per_cell: int = 192, repeats: int = 2, threads: int = 2, skip_encoder: bool = False,
        skip_slide: bool = False, slide_size: int = 8192, patch_size: int = 256, crop_size: int = 224,
        work_dir: str | None = None, backend: str = "auto", write_md: str | None = None,
        output_json: str | None = None, compare: bool = True, compare_sizes: Sequence[int] = (4096, 8192, 12288),
        compare_repeats: int = 3) -> None:
    """Benchmark encoder throughput and slide inference on the CPU and print Markdown tables.

    Args:
        quick: a tiny smoke run (32 px encoder inputs, batches 2 and 4, a 768 px slide with 64 px patches cropped
            to 32, one round); says nothing about speed.
        densenet: also benchmark DenseNet121 (slow on CPU).
        batch_sizes: encoder batch sizes; the largest is also the slide-inference batch size.
        image_size: encoder input side for the throughput table.
        patches_per_cell: patches per throughput cell and round.
        repeats: rounds; every value is the best round.
        threads: ``torch.set_num_threads``.
        skip_encoder: skip the throughput table.
        skip_slide: skip the slide-inference comparison.
        slide_size: side of the synthetic slide (8192 px gives about 330 tissue patches of 256 px).
        patch_size: patch grid cell of the slide.
        crop_size: centre crop fed to the encoder in slide inference.
        work_dir: where the slide, prepared grid and outputs go (default: ``<tmp>/monai_wsi_bench``; the slide is
            reused between runs).
        backend: slide reader backend.
        write_md: Markdown file to insert/replace this benchmark's section in (e.g. ``BENCHMARKS.md``).
        output_json: also write the raw results here.
        compare: also run :func:`compare_benchmark`: the project's slide inference on every installed runtime and
            precision (torch fp32 at batch 64, the former default, and 16; ONNX Runtime and OpenVINO fp32 and int8
            at 16) against MONAI's ``PatchInferer`` peer at ``slide_size``, and the per-patch cost at
            ``compare_sizes``.
        compare_sizes: slide sizes of the per-patch cost.
        compare_repeats: interleaved rounds of the comparison.
    """
    setup_logging("INFO")
    sizes = (int(batch_sizes),) if isinstance(batch_sizes, (int, float, str)) else tuple(int(b) for b in batch_sizes)
    res = benchmark(quick, densenet, sizes, image_size, patches_per_cell, repeats,
                    threads, skip_encoder, skip_slide, slide_size, patch_size, crop_size, work_dir, backend, compare,
                    compare_sizes, compare_repeats)
    command = "python scripts/bench_inference.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = markdown(res, command.strip())
    publish(md, res, MARKER, write_md, output_json)


if __name__ == "__main__":
    fire.Fire({"run": run})
