"""CPU encoder-only sweep: runtime / precision x batch size x threads, to choose the batch size and the thread count
of each runtime by measurement.

What is measured: the throughput (patches/s) of the project's GoogLeNet patch encoder, ``features`` + ``head`` (the
graph that :func:`monai_wsi_ext.runtime.onnx.export_onnx` exports: features and head logits), over the same
``n_patches`` random patches already in memory (uniform pixels, fixed seed, ``image_size`` px), for every
combination of

- runtime / precision: eager torch fp32 (channels_last, ``torch.inference_mode``); ``torch.compile`` fp32 (inductor,
  channels_last, ``dynamic=False``, compiled once at ``compile_batch`` and measured only at that batch, at every
  thread count; the compile time is recorded); ONNX Runtime fp32; OpenVINO fp32; ONNX Runtime int8; OpenVINO int8.
  A runtime that is not installed (:func:`monai_wsi_ext.runtime.runtime_available`) is skipped and named in the
  output;
- batch size (``batch_sizes``);
- threads (``threads``): ``torch.set_num_threads(t)`` and the runtime session's ``threads=t``.

Each cell is the best of ``repeats`` rounds; a round encodes all ``n_patches`` patches in whole batches (the last
batch is completed from the start of the patch set when ``n_patches`` is not a multiple of the batch, so that every
call has the same shape and the compiled graph is never recompiled), after one untimed warm-up batch. The rounds run
over all cells in turn, so a burst of load from other processes hits every cell alike. Each cell is reported as
patches/s and as the ratio to eager torch fp32 at the reference batch (``reference_batch``, 16, or the largest
measured batch below it) with the same thread count; per runtime / precision and thread count the fastest batch is
listed.

The encoder has random He-initialised weights with batch-norm statistics from 64 other random patches (the
``input_sensitive_encoder`` of ``bench_inference.py``); speed does not depend on the weights. The ONNX encoder is
exported once per run into ``work_dir``; the int8 encoder is a static QDQ model
(:func:`monai_wsi_ext.runtime.int8.quantize_encoder`) calibrated on those 64 random patches. **The int8 model is
for speed only: its accuracy is not measured here** (``scripts/calibrate_int8.py`` measures it on real slides).
ONNX sessions are used directly (:func:`monai_wsi_ext.runtime.backends.open_session`), fed NCHW float32 tensors.

``torch.compile``: inductor's C++ kernels normally hard-code the thread count they were compiled with; the sweep
sets ``torch._inductor.config.cpp.dynamic_threads`` so that the graph compiled once follows ``torch.set_num_threads``
at every thread count (the number of graphs dynamo compiled is recorded, to show that nothing was recompiled).

Usage::

    python scripts/bench_runtime_sweep.py run --write_md BENCHMARKS.md --output_json sweep.json
    python scripts/bench_runtime_sweep.py run --quick
    python scripts/bench_runtime_sweep.py run --batch_sizes 8,16,32 --threads 1,2 --compile False

Timings on a shared machine are noisy; the load average before and after the run is recorded with the tables.
OpenMP wait policy: as in ``bench_inference.py``, ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` (unless already set)
before torch is imported, and the policy in effect is recorded.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from monai_wsi_ext.testing.bench import passive_omp_policy  # noqa: E402 - no torch import behind it

OMP_POLICY = passive_omp_policy()  # before torch loads its OpenMP runtime; see the docstring

import fire  # noqa: E402
import torch  # noqa: E402

from monai_wsi_ext.runtime import runtime_available  # noqa: E402
from monai_wsi_ext.testing.bench import publish  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402

__all__ = ["MARKER", "CONFIGS", "sweep", "markdown", "run"]

logger = logging.getLogger("bench_runtime_sweep")

MARKER = "bench_runtime_sweep"

CONFIGS = (
    ("torch eager fp32", "torch", "fp32"),
    ("torch.compile fp32", "torch.compile", "fp32"),
    ("onnxruntime fp32", "onnxruntime", "fp32"),
    ("openvino fp32", "openvino", "fp32"),
    ("onnxruntime int8", "onnxruntime", "int8"),
    ("openvino int8", "openvino", "int8"),
)
"""(name, runtime, precision) of the sweep's rows, in table order; ``torch eager fp32`` is the ratio reference."""

REFERENCE = "torch eager fp32"
N_CALIBRATION = 64


def _bench_inference():
    """``scripts/bench_inference.py`` as a module (for ``input_sensitive_encoder``)."""
    name = "_bench_inference_for_sweep"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("bench_inference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _ints(values) -> tuple[int, ...]:
    """A fire argument (``4``, ``4,8`` or a sequence) as a tuple of ints."""
    if isinstance(values, str):
        values = [v for v in values.replace(" ", "").strip("()[]").split(",") if v]
    elif isinstance(values, (int, float)):
        values = [values]
    return tuple(int(v) for v in values)


def _whole_batches(patches: torch.Tensor, batch_size: int, memory_format: torch.memory_format) -> list[torch.Tensor]:
    """All patches in batches of exactly ``batch_size``, the last one completed from the start of the patch set."""
    n = len(patches)
    n_batches = max(1, math.ceil(n / batch_size))
    index = torch.arange(n_batches * batch_size) % n
    return [patches[index[i:i + batch_size]].contiguous(memory_format=memory_format)
            for i in range(0, len(index), batch_size)]


def _reference_batch(batch_sizes: Sequence[int], wanted: int) -> int:
    """``wanted`` when measured, else the largest measured batch below it (the smallest batch when none is)."""
    below = [b for b in batch_sizes if b <= wanted]
    return max(below) if below else min(batch_sizes)


def _export(work: Path, encoder: torch.nn.Module, image_size: int, calibration: torch.Tensor, int8: bool) -> dict:
    """Write ``encoder_<S>.onnx`` (fp32) and, when ``int8``, ``encoder_<S>.int8.onnx`` calibrated on
    ``calibration``."""
    from monai_wsi_ext.runtime.onnx import export_onnx

    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / f"encoder_{image_size}.onnx"
    settings = {"crop_size": image_size, "canvas_size": 32, "feature_dim": encoder.feature_dim}
    t0 = time.perf_counter()
    export_onnx(encoder, "encoder", fp32, example=torch.rand(2, 3, image_size, image_size), settings=settings)
    out = {"fp32": fp32, "export_s": round(time.perf_counter() - t0, 1)}
    if int8:
        from monai_wsi_ext.runtime.int8 import quantize_encoder

        t0 = time.perf_counter()
        out["int8"] = quantize_encoder(fp32, calibration, work / f"encoder_{image_size}.int8.onnx")
        out["quantize_s"] = round(time.perf_counter() - t0, 1)
    return out


def _compile(graph: torch.nn.Module, example: torch.Tensor, threads: int) -> tuple:
    """``torch.compile`` (inductor, ``dynamic=False``) of ``graph``, compiled by one call on ``example``.

    Returns:
        ``(compiled module, compile seconds, graphs compiled so far)``.
    """
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    inductor_config.cpp.dynamic_threads = True  # one compiled graph for every thread count (see the docstring)
    torch.set_num_threads(int(threads))
    compiled = torch.compile(graph, backend="inductor", dynamic=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(example)
    return compiled, time.perf_counter() - t0, int(counters["stats"]["unique_graphs"])


def _time_round(fn, batches: list[torch.Tensor]) -> float:
    """Seconds to run ``fn`` over ``batches`` after one untimed warm-up batch."""
    with torch.inference_mode():
        fn(batches[0])  # warm-up: primitives / shapes for this batch size
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        return time.perf_counter() - t0


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "omp_wait_policy": OMP_POLICY}


def sweep(image_size: int = 224, batch_sizes: Sequence[int] = (4, 8, 16, 32, 64), threads: Sequence[int] = (1, 2),
          n_patches: int = 128, repeats: int = 2, compile: bool = True, compile_batch: int = 16,
          reference_batch: int = 16, work_dir: str | os.PathLike | None = None) -> dict:
    """Measure every (runtime / precision, batch size, threads) cell; see :func:`run` for the arguments.

    Returns:
        dict with ``settings``, ``machine``, ``configs`` (the measured rows), ``skipped`` (rows not measured, with
        the reason), ``cells`` (one per measured cell: ``config``, ``runtime``, ``precision``, ``threads``,
        ``batch_size``, ``patches`` per round, ``seconds`` (best round), ``rate`` (patches/s of the best round),
        ``rounds`` (patches/s of every round), ``ratio`` (to eager torch at the reference batch, same threads)),
        ``fastest`` (per row and thread count: the fastest batch), ``compile`` and ``export`` (times), and the
        load average and wall time.
    """
    from monai_wsi_ext.runtime.backends import open_session
    from monai_wsi_ext.runtime.onnx import EncoderGraph

    batch_sizes = sorted(set(_ints(batch_sizes)))
    threads = list(dict.fromkeys(_ints(threads)))
    if not batch_sizes or not threads or min(batch_sizes) < 1 or min(threads) < 1 or int(n_patches) < 1:
        raise ValueError("batch_sizes, threads and n_patches must be positive.")
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "monai_wsi_bench_runtime_sweep"
    res: dict = {"quick": False, "machine": _machine(),
                 "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "loadavg_before": [round(v, 2) for v in os.getloadavg()], "skipped": [], "compile": None,
                 "export": None}
    t_start = time.perf_counter()

    gen = torch.Generator().manual_seed(0)
    patches = torch.rand(int(n_patches), 3, image_size, image_size, generator=gen)
    calibration = torch.rand(N_CALIBRATION, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(max(threads))
    encoder = _bench_inference().input_sensitive_encoder("googlenet", calibration)

    configs = []
    for name, runtime, precision in CONFIGS:
        if runtime == "torch.compile" and not compile:
            res["skipped"].append({"config": name, "reason": "not asked for (`--compile False`, or quick mode)"})
        elif runtime_available(runtime.split(".")[0]):
            configs.append((name, runtime, precision))
        else:
            res["skipped"].append({"config": name, "reason": f"{runtime} is not installed"})
    onnx_rows = [c for c in configs if c[1] in ("onnxruntime", "openvino")]
    models: dict = {}
    if onnx_rows:
        int8 = any(c[2] == "int8" for c in onnx_rows)
        if int8 and not runtime_available("onnxruntime"):  # quantize_encoder needs ONNX Runtime
            res["skipped"] += [{"config": c[0], "reason": "the int8 model is made with onnxruntime, not installed"}
                               for c in onnx_rows if c[2] == "int8"]
            configs = [c for c in configs if c[2] != "int8"]
            int8 = False
        from monai_wsi_ext.errors import ConfigError

        try:
            models = _export(work, encoder, image_size, calibration, int8)
        except ConfigError as e:  # onnx / onnxscript missing, or the export failed
            res["skipped"] += [{"config": c[0], "reason": str(e)} for c in configs if c in onnx_rows]
            configs = [c for c in configs if c not in onnx_rows]
        else:
            res["export"] = {"export_s": models["export_s"], "quantize_s": models.get("quantize_s"),
                             "n_calibration": N_CALIBRATION if int8 else 0}

    encoder.to(memory_format=torch.channels_last)
    graph = EncoderGraph(encoder).eval()
    compile_batch = int(compile_batch)
    fmt_of = {"torch": torch.channels_last, "torch.compile": torch.channels_last}
    batch_lists: dict = {}

    def batches(runtime: str, b: int) -> list[torch.Tensor]:
        fmt = fmt_of.get(runtime, torch.contiguous_format)
        if (fmt, b) not in batch_lists:
            batch_lists[fmt, b] = _whole_batches(patches, b, fmt)
        return batch_lists[fmt, b]

    fns: dict = {}
    for name, runtime, precision in configs:
        for t in threads:
            if runtime == "torch":
                fns[name, t] = graph
            elif runtime in ("onnxruntime", "openvino"):
                fns[name, t] = open_session(str(models[precision]), runtime, threads=t)
    if any(c[1] == "torch.compile" for c in configs):
        name = next(c[0] for c in configs if c[1] == "torch.compile")
        compiled, compile_s, graphs = _compile(graph, batches("torch.compile", compile_batch)[0], max(threads))
        for t in threads:
            fns[name, t] = compiled
        res["compile"] = {"batch_size": compile_batch, "compile_s": round(compile_s, 1), "threads": max(threads),
                          "graphs_after_compile": graphs}
        logger.info("torch.compile at batch %d: %.1f s", compile_batch, compile_s)

    cells = [(name, runtime, precision, t, b) for t in threads for name, runtime, precision in configs
             for b in ([compile_batch] if runtime == "torch.compile" else batch_sizes)]
    rounds: dict[tuple, list[float]] = {c: [] for c in cells}
    seconds: dict[tuple, float] = {}
    for r in range(max(int(repeats), 1)):
        for cell in cells:
            name, runtime, _, t, b = cell
            torch.set_num_threads(t)
            xs = batches(runtime, b)
            dt = _time_round(fns[name, t], xs)
            rate = len(xs) * b / dt
            rounds[cell].append(rate)
            seconds[cell] = min(seconds.get(cell, math.inf), dt)
            logger.info("round %d: %s, %d thread(s), batch %d: %.1f patches/s", r, name, t, b, rate)
    if res["compile"] is not None:
        from torch._dynamo.utils import counters

        res["compile"]["graphs_after_sweep"] = int(counters["stats"]["unique_graphs"])

    ref_batch = _reference_batch(batch_sizes, int(reference_batch))
    out = []
    for cell in cells:
        name, runtime, precision, t, b = cell
        out.append({"config": name, "runtime": runtime, "precision": precision, "threads": t, "batch_size": b,
                    "patches": len(batches(runtime, b)) * b, "seconds": round(seconds[cell], 4),
                    "rate": round(max(rounds[cell]), 2), "rounds": [round(x, 2) for x in rounds[cell]]})
    for c in out:
        ref = next(x["rate"] for x in out if x["config"] == REFERENCE and x["threads"] == c["threads"]
                   and x["batch_size"] == ref_batch)
        c["ratio"] = round(c["rate"] / ref, 3)
    fastest = []
    for name, runtime, precision in configs:
        for t in threads:
            mine = [c for c in out if c["config"] == name and c["threads"] == t]
            best = max(mine, key=lambda c: c["rate"])
            fastest.append({"config": name, "threads": t, "batch_size": best["batch_size"], "rate": best["rate"],
                            "ratio": best["ratio"], "batches_measured": len(mine)})
    res.update({"settings": {"image_size": int(image_size), "batch_sizes": batch_sizes, "threads": threads,
                             "n_patches": int(n_patches), "repeats": int(repeats), "compile": bool(compile),
                             "compile_batch": compile_batch, "reference_batch": int(reference_batch),
                             "reference_batch_used": ref_batch},
                "configs": [c[0] for c in configs], "cells": out, "fastest": fastest,
                "wall_s": round(time.perf_counter() - t_start, 1),
                "loadavg_after": [round(v, 2) for v in os.getloadavg()]})
    return res


def _table(res: dict, t: int) -> str:
    """Markdown table of the cells at ``t`` threads: rows runtime / precision, columns batch sizes."""
    mine = [c for c in res["cells"] if c["threads"] == t]
    cols = sorted({c["batch_size"] for c in mine})
    ref = res["settings"]["reference_batch_used"]
    lines = ["| runtime / precision | " + " | ".join(f"batch {b}" for b in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name in res["configs"]:
        row = []
        for b in cols:
            c = next((c for c in mine if c["config"] == name and c["batch_size"] == b), None)
            if c is None:
                row.append("-")
            else:
                mark = " **reference**" if (name, b) == (REFERENCE, ref) else ""
                row.append(f"{c['rate']:.1f} ({c['ratio']:.2f}x){mark}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(res: dict, command: str) -> str:
    """The ``BENCHMARKS.md`` section of a :func:`sweep` result."""
    m, s = res["machine"], res["settings"]
    ref, wanted = s["reference_batch_used"], s["reference_batch"]
    out = ["## Runtime, batch size and threads (CPU encoder-only sweep)", "",
           f"Command: `{command}`  ",
           f"Date: {res['date']}; {m['cpus']} CPUs ({m['processor']}), torch {m['torch']}, Python {m['python']}, "
           f"`OMP_WAIT_POLICY={m['omp_wait_policy']}`; wall time {res['wall_s']} s; load average (1/5/15 min) "
           f"{res['loadavg_before']} before, {res['loadavg_after']} after."]
    if res["quick"]:
        out += ["", "**Quick smoke run (tiny sizes): the numbers say nothing about speed.**"]
    ref_note = f"batch {ref}" + ("" if ref == wanted else f" (batch {wanted} was not measured; the largest measured "
                                                          f"batch not above it)")
    out += ["", f"GoogLeNet encoder, `features` + `head` (features and head logits), {s['image_size']} px random "
            f"patches, {s['n_patches']} patches per cell and round in whole batches, best of {s['repeats']} "
            "round(s) taken in turn over all cells. Eager torch and torch.compile run channels_last under "
            "`torch.inference_mode`; ONNX Runtime and OpenVINO run the exported ONNX encoder, fed NCHW. Threads: "
            "`torch.set_num_threads(t)` and the session's `threads=t`. Each cell: patches/s (ratio to "
            f"**torch eager fp32 at {ref_note}** with the same threads)."]
    cm = res.get("compile")
    if cm:
        out += ["", f"torch.compile (inductor, `dynamic=False`, `cpp.dynamic_threads`): compiled once at batch "
                f"{cm['batch_size']} with {cm['threads']} thread(s) in **{cm['compile_s']} s** and measured only at "
                f"that batch; dynamo graphs compiled: {cm['graphs_after_compile']} after the compile, "
                f"{cm['graphs_after_sweep']} after the sweep."]
    ex = res.get("export")
    if ex:
        line = f"ONNX export: {ex['export_s']} s (not timed in the cells)."
        if ex.get("n_calibration"):
            line += (f" int8: static QDQ model calibrated on {ex['n_calibration']} other random patches "
                     f"({ex['quantize_s']} s); **for speed only, its accuracy is not measured here.**")
        out += ["", line]
    if res["skipped"]:
        out += ["", "Not measured: " + "; ".join(f"{x['config']} ({x['reason']})" for x in res["skipped"]) + "."]
    for t in s["threads"]:
        out += ["", f"### {t} thread{'s' if t != 1 else ''}", "", _table(res, t)]
    out += ["", "### Fastest batch per runtime / precision and threads", ""]
    for f in res["fastest"]:
        only = " (the only batch measured)" if f["batches_measured"] == 1 else ""
        out.append(f"- {f['config']}, {f['threads']} thread{'s' if f['threads'] != 1 else ''}: batch "
                   f"{f['batch_size']}{only}, {f['rate']:.1f} patches/s ({f['ratio']:.2f}x)")
    return "\n".join(out)


def run(quick: bool = False, image_size: int = 224, batch_sizes: Sequence[int] = (4, 8, 16, 32, 64),
        threads: Sequence[int] = (1, 2), n_patches: int = 128, repeats: int = 2, compile: bool | None = None,
        compile_batch: int = 16, reference_batch: int = 16, work_dir: str | None = None,
        write_md: str | None = None, output_json: str | None = None) -> None:
    """Sweep runtime / precision, batch size and threads of the encoder on the CPU and print Markdown tables.

    Args:
        quick: a tiny smoke run (32 px patches, batches 2 and 4, 1 thread, 8 patches, one round, no torch.compile
            unless ``compile`` is given too); says nothing about speed.
        image_size: patch side in pixels (the encoder's input).
        batch_sizes: batch sizes (``4,8,16``).
        threads: thread counts (``1,2``).
        n_patches: patches per cell and round.
        repeats: rounds; every cell is its best round.
        compile: also ``torch.compile`` (default: yes, except in quick mode; compiling takes minutes on a CPU).
        compile_batch: the one batch size torch.compile is compiled for and measured at.
        reference_batch: eager torch's batch of the ratios (the largest measured batch below it when not measured).
        work_dir: folder of the ONNX models (default: ``<tmp>/monai_wsi_bench_runtime_sweep``).
        write_md: Markdown file to insert/replace this benchmark's section in (e.g. ``BENCHMARKS.md``).
        output_json: also write the raw results here (the :func:`sweep` result).
    """
    setup_logging("INFO")
    if quick:
        image_size, batch_sizes, threads, n_patches, repeats = 32, (2, 4), (1,), 8, 1
    do_compile = (not quick) if compile is None else bool(compile)
    res = sweep(image_size, batch_sizes, threads, n_patches, repeats, do_compile, compile_batch, reference_batch,
                work_dir)
    res["quick"] = bool(quick)
    command = "python scripts/bench_runtime_sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res["command"] = command.strip()
    md = markdown(res, res["command"])
    publish(md, res, MARKER, write_md, output_json)


if __name__ == "__main__":
    fire.Fire({"run": run})
