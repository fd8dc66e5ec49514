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

from monai_wsi_ext.io.atomic import write_json_atomic  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402
from monai_wsi_ext.testing.bench import cached_synthetic_slide, replace_section  # noqa: E402

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


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
            "omp_wait_policy": OMP_POLICY}


def benchmark(quick: bool = False, densenet: bool = False, batch_sizes: Sequence[int] = (16, 32, 64),
              image_size: int = 224, patches_per_cell: int = 192, repeats: int = 2, threads: int = 2,
              skip_encoder: bool = False, skip_slide: bool = False, slide_size: int = 8192, patch_size: int = 256,
              crop_size: int = 224, work_dir: str | None = None, backend: str = "auto") -> dict:
    """Run the benchmarks and return their results (see :func:`run` for the arguments)."""
    if quick:
        batch_sizes, image_size, patches_per_cell, repeats = (2, 4), 32, 4, 1
        slide_size, patch_size, crop_size = 768, 64, 32
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
    return "\n".join(out)


def run(quick: bool = False, densenet: bool = False, batch_sizes: Sequence[int] = (16, 32, 64), image_size: int = 224,
        patches_per_cell: int = 192, repeats: int = 2, threads: int = 2, skip_encoder: bool = False,
        skip_slide: bool = False, slide_size: int = 8192, patch_size: int = 256, crop_size: int = 224,
        work_dir: str | None = None, backend: str = "auto", write_md: str | None = None,
        output_json: str | None = None) -> None:
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
    """
    setup_logging("INFO")
    sizes = (int(batch_sizes),) if isinstance(batch_sizes, (int, float, str)) else tuple(int(b) for b in batch_sizes)
    res = benchmark(quick, densenet, sizes, image_size, patches_per_cell, repeats,
                    threads, skip_encoder, skip_slide, slide_size, patch_size, crop_size, work_dir, backend)
    command = "python scripts/bench_inference.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = markdown(res, command.strip())
    print(md)
    if output_json:
        write_json_atomic(output_json, res)
    if write_md:
        replace_section(write_md, MARKER, md)
        print(f"\nwrote the '{MARKER}' section of {write_md}")


if __name__ == "__main__":
    fire.Fire({"run": run})
