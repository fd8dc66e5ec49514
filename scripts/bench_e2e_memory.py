"""Bounded memory of the end-to-end (surrogate-loss) training step, against naive full back-propagation.

For each number of patches N, two measurements run, each in its own subprocess so that its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, plus ``torch.cuda.max_memory_allocated`` on CUDA) is its own:

* ``e2e``: :func:`monai_wsi_ext.engines.e2e.e2e_step` with a :class:`~monai_wsi_ext.data.patches.SlidePatchSource` whose
  ``load(indices, seeds)`` re-reads the patches from the slide in both passes (replaying the augmentation from the
  seeds), ``chunk_size`` patches at a time;
* ``naive``: all N patches loaded into memory, the encoder run over all of them with gradients (in chunks, but the
  graph of all N kept), scattered onto the canvas, the U-Net, the loss, one ``backward()``.

Both use a real GoogLeNet :class:`~monai_wsi_ext.model.networks.PatchEncoder` (eval mode, as the end-to-end step requires)
and the bundle's MONAI UNet (``common.json#unet_def``, :func:`canvas_unet`), the same initial weights, the same
pixels and augmentation seeds; their losses and gradient norms are reported so that one can check both computed the
same thing.
The N patches are laid out row by row on a square canvas of side ``ceil(sqrt(N))`` rounded up to a multiple of 16.
They are the first N tissue cells of one generated slide; when the slide has fewer cells they repeat (the table says
how many are distinct). An idle child (imports, models, slide opened, one warm-up chunk, no step) gives the baseline.

Every child runs under a memory cap (``RLIMIT_AS`` set so that about ``cap_gb`` can be resident, and a watchdog in
the parent that kills a child whose resident memory passes the cap), so the naive runs that do not fit report
"OOM at X GB" instead of exhausting the shared machine.

``--quick`` is a smoke run: N = 64 and 128 with 32 px patches, measured in the calling process (no subprocesses, no
cap), so its peak memory is cumulative and says nothing; it exists so that the script is exercised by the tests.

OpenMP wait policy: unless ``OMP_WAIT_POLICY`` is already set, the script sets it to ``PASSIVE`` before torch is
loaded (children inherit it): on a machine whose cores are shared with other busy processes, spinning OpenMP threads
made 2-thread torch about 10x slower than 1 thread in an ad-hoc test. The policy in effect is recorded with the
results.

Usage::

    python scripts/bench_e2e_memory.py run --write_md BENCHMARKS.md
    python scripts/bench_e2e_memory.py run --quick
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from monai_wsi_ext.testing.bench import passive_omp_policy  # noqa: E402 - no torch import behind it

OMP_POLICY = passive_omp_policy()  # before torch loads its OpenMP runtime; see the docstring

import fire  # noqa: E402
import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from monai_wsi_ext.io.atomic import write_json_atomic  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402
from monai_wsi_ext.testing.bench import cached_synthetic_slide, replace_section  # noqa: E402

__all__ = ["MARKER", "UNET_CONFIG", "canvas_unet", "CountingLoader", "measure", "child", "run_child", "benchmark",
           "table", "summary_lines", "markdown", "replace_section", "run"]

UNET_CONFIG = REPO_ROOT / "bundle" / "configs" / "common.json"
"""The bundle config that defines the canvas U-Net (``unet_def``): the benchmarks measure the bundle's U-Net."""


def canvas_unet(feature_dim: int):
    """The bundle's canvas U-Net (``common.json#unet_def``) for a ``feature_dim``-channel canvas."""
    from monai_wsi_ext.model.networks import bundle_unet

    return bundle_unet(UNET_CONFIG, feature_dim=int(feature_dim))


logger = logging.getLogger("bench_e2e_memory")

MARKER = "bench_e2e_memory"
GB = 1024**3


# --------------------------------------------------------------------------------------------------- child side


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """``Vm*``/``Rss*`` fields of ``/proc/<pid>/status`` in bytes (empty when unavailable)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if key.startswith(("Vm", "Rss")) and len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _proc_io() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (``ru_maxrss`` is in KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class CountingLoader:
    """``load(indices, seeds)`` over a virtual table of N patches mapped onto slide cells, counting what it reads.

    Args:
        source: the slide's :class:`~monai_wsi_ext.data.patches.SlidePatchSource`.
        cells: (N,) slide cell of each virtual patch.
        read_size: patch side read from the slide (pixels), for the decoded-bytes count.
    """

    def __init__(self, source, cells: np.ndarray, read_size: int):
        self.source = source
        self.cells = np.asarray(cells, np.int64)
        self.read_size = int(read_size)
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.patches = 0

    @property
    def decoded_bytes(self) -> int:
        """RGB uint8 bytes decoded from the slide so far."""
        return self.patches * self.read_size * self.read_size * 3

    def __call__(self, indices, seeds):
        import torch

        idx = torch.as_tensor(indices).reshape(-1).cpu().numpy()
        self.calls += 1
        self.patches += int(idx.size)
        return self.source.load(self.cells[idx], torch.as_tensor(seeds).reshape(-1))


def _naive_step(encoder, unet, loader, n, labels, layouts, loss_fn, seeds, chunk_size, dev, progress: dict):
    """Ordinary back-propagation through the whole graph: every patch in memory, every activation kept."""
    import torch

    from monai_wsi_ext.model.canvas import layout_label_canvas, scatter_to_canvas
    from monai_wsi_ext.model.predict import eval_mode

    t0 = time.perf_counter()
    first = loader(torch.arange(min(chunk_size, n)), seeds[: min(chunk_size, n)])
    pixels = torch.empty((n, *first.shape[1:]), dtype=first.dtype)  # all N patches, kept for the whole step
    pixels[: first.shape[0]] = first
    for start in range(first.shape[0], n, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, n))
        pixels[idx] = loader(idx, seeds[idx])
    progress["loaded"] = n
    load_s = time.perf_counter() - t0
    with eval_mode(encoder):
        feats = []
        for start in range(0, n, chunk_size):
            feats.append(encoder.features(pixels[start:start + chunk_size].to(dev)))  # graph of every chunk kept
            progress["encoded"] = start + feats[-1].shape[0]
        x = torch.cat(feats)
        del feats
        canvas = torch.stack([scatter_to_canvas(x[lay.indices.long().to(dev)], lay.rows, lay.cols, lay.size,
                                                lay.offset) for lay in layouts])
        targets = torch.stack([layout_label_canvas(labels, lay) for lay in layouts]).to(dev)
        loss = loss_fn(unet(canvas), targets)
        loss.backward()
    return {"loss": float(loss.detach()), "load_s": round(load_s, 3)}


def _grad_norm(module) -> float:
    sq = [float(p.grad.double().pow(2).sum()) for p in module.parameters() if p.grad is not None]
    return math.sqrt(sum(sq)) if sq else 0.0


def _reader_version(backend: str) -> str:
    try:
        if backend == "cucim":
            import cucim

            return f"cucim {cucim.__version__}"
        if backend == "openslide":
            import openslide

            return f"openslide {openslide.__library_version__} (python {openslide.__version__})"
        if backend == "tiffslide":
            import tiffslide

            return f"tiffslide {tiffslide.__version__}"
    except (ImportError, AttributeError):
        pass
    return backend


def measure(spec: dict) -> dict:
    """Run one measurement (in the calling process) and return its result.

    Args:
        spec: ``mode`` (``idle``, ``e2e`` or ``naive``), ``n`` (patches), ``prepared_dir`` (a ``prepare_dataset``
            output holding one slide), ``crop_size`` (None or the random crop), ``chunk_size``, ``threads``,
            ``device``, ``seed``, ``channels_last``, ``cap_bytes`` (None: no ``RLIMIT_AS``), ``backend``,
            ``heap_trim`` (False replaces ``monai_wsi_ext.data.patches._release_free_heap`` by a no-op, for comparison).

    Returns:
        dict with ``mode``, ``n``, ``status`` (``ok`` or ``oom``), ``setup_peak_rss`` and ``peak_rss`` (bytes),
        ``step_s``, ``loss``, ``unet_grad_norm``, ``encoder_grad_norm``, ``load_calls``, ``patches_read``,
        ``decoded_bytes``, ``rchar`` (bytes read by the process during the step), ``distinct_cells``,
        ``canvas_size``, ``cuda_peak`` (bytes, CUDA only) and, for an OOM, ``error`` and ``progress``.
    """
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    from monai_wsi_ext.model.canvas import plan_canvases
    from monai_wsi_ext.data.patches import SlidePatchSource, make_patch_transform
    from monai_wsi_ext.prep.prepare import load_prepared_slides
    from monai_wsi_ext.engines.e2e import draw_seeds, e2e_step
    from monai_wsi_ext.labels import LABEL_NORMAL
    from monai_wsi_ext.model.networks import PatchEncoder, canvas_loss

    if not spec.get("heap_trim", True):  # A/B run: the reader path without its heap trim (see data.py)
        import monai_wsi_ext.data.patches as data_module

        data_module._release_free_heap = lambda: None
    mode, n = spec["mode"], int(spec["n"])
    chunk = int(spec.get("chunk_size", 64))
    dev_name = spec.get("device", "auto")
    dev = torch.device("cuda" if dev_name == "auto" and torch.cuda.is_available() else
                       ("cpu" if dev_name == "auto" else dev_name))
    meta = load_prepared_slides(spec["prepared_dir"])[0]
    grid = meta.grid
    n_cells = len(grid)
    if n_cells == 0:
        raise RuntimeError(f"{spec['prepared_dir']}: the prepared slide has no tissue cells")
    cells = np.arange(n) % n_cells
    transform = make_patch_transform(True, spec.get("crop_size"))  # the training augmentation, replayed from seeds
    source = SlidePatchSource.from_prepared(meta, transform, spec.get("backend", "auto"))
    loader = CountingLoader(source, cells, grid.patch_size)

    side = math.isqrt(n - 1) + 1 if n > 1 else 1
    canvas_size = max(16, -(-side // 16) * 16)
    rows = torch.arange(n) // side
    cols = torch.arange(n) % side
    labels = torch.from_numpy(grid.labels[cells].astype(np.int64))
    labels[labels < 0] = LABEL_NORMAL  # every placed patch counts in the loss
    layouts = plan_canvases(rows, cols, canvas_size)

    torch.manual_seed(int(spec.get("seed", 0)))
    encoder = PatchEncoder("googlenet").to(dev)
    if spec.get("channels_last", True):
        encoder.to(memory_format=torch.channels_last)
    unet = canvas_unet(encoder.feature_dim).to(dev).train()
    loss_fn = canvas_loss()
    seeds = draw_seeds(n, torch.Generator().manual_seed(int(spec.get("seed", 0)) + 1))

    # warm-up (also in the idle baseline): one chunk through encoder and U-Net with gradients, the slide opened
    warm = loader(torch.arange(min(chunk, n)), seeds[: min(chunk, n)]).to(dev)
    encoder.eval()
    encoder.features(warm).sum().backward()
    unet(torch.zeros(1, encoder.feature_dim, canvas_size, canvas_size, device=dev)).sum().backward()
    encoder.zero_grad(set_to_none=True)
    unet.zero_grad(set_to_none=True)
    del warm
    loader.reset()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    result = {"mode": mode, "n": n, "status": "ok", "device": str(dev), "distinct_cells": int(min(n, n_cells)),
              "slide_cells": n_cells, "canvas_size": canvas_size, "read_size": grid.patch_size,
              "crop_size": spec.get("crop_size"), "chunk_size": chunk, "setup_peak_rss": _peak_rss(),
              "setup_rss": _proc_status().get("VmRSS", 0), "reader": _reader_version(source.slide.backend)}
    cap = spec.get("cap_bytes")
    if cap and mode != "idle":
        st = _proc_status()
        limit = int(st.get("VmSize", 0) + max(int(cap) - st.get("VmRSS", 0), 0))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result["rlimit_as"] = limit
    if mode == "idle":
        result.update(peak_rss=_peak_rss(), step_s=0.0)
        source.close()
        return result

    io0 = _proc_io()
    progress: dict = {}
    t0 = time.perf_counter()
    try:
        if mode == "e2e":
            out = e2e_step(encoder, unet, loader, n, rows, cols, labels, layouts, loss_fn, chunk_size=chunk,
                           seeds=seeds, device=dev)
            if out["skipped"] or not out["finite"]:
                raise RuntimeError(f"e2e_step did not run a full step: skipped={out['skipped']}, "
                                   f"finite={out['finite']}")
            result["loss"] = float(out["loss"])
        elif mode == "naive":
            result.update(_naive_step(encoder, unet, loader, n, labels, layouts, loss_fn, seeds, chunk, dev,
                                      progress))
        else:
            raise ValueError(f"`mode` must be 'idle', 'e2e' or 'naive', got {mode!r}.")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        result["step_s"] = round(time.perf_counter() - t0, 3)
    except (RuntimeError, MemoryError) as e:  # CPU allocator failures under RLIMIT_AS, CUDA OOM
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, MemoryError) and "memory" not in msg.lower() and "alloc" not in msg.lower():
            raise
        result.update(status="oom", error=f"{type(e).__name__}: {msg[:200]}", progress=dict(progress),
                      step_s=round(time.perf_counter() - t0, 3))
    io1 = _proc_io()
    result.update(peak_rss=_peak_rss(), load_calls=loader.calls, patches_read=loader.patches,
                  decoded_bytes=loader.decoded_bytes, rchar=io1.get("rchar", 0) - io0.get("rchar", 0))
    if result["status"] == "ok":
        result.update(unet_grad_norm=_grad_norm(unet), encoder_grad_norm=_grad_norm(encoder))
    if dev.type == "cuda":
        result["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    source.close()
    return result


def child(spec_path: str, out_path: str) -> None:
    """Subprocess entry: read a spec JSON, :func:`measure`, write the result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = measure(spec)
    write_json_atomic(out_path, result)


# --------------------------------------------------------------------------------------------------- parent side


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(spec: dict, work_dir: Path, cap_bytes: int | None, timeout_s: float = 1800.0) -> dict:
    """Run :func:`measure` in a fresh subprocess under the memory cap; always returns a result dict.

    A watchdog polls the child's resident memory and kills it past ``cap_bytes`` + 512 MiB (the child's own
    ``RLIMIT_AS`` normally stops it first, with an allocation error it reports). The child's peak resident memory
    is also taken from ``wait4`` so that a killed or crashed child still has one.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{spec['mode']}_{spec['n']}_{spec.get('crop_size') or 'full'}_{os.getpid()}_{time.monotonic_ns()}"
    spec_path, out_path = work_dir / f"spec_{tag}.json", work_dir / f"result_{tag}.json"
    write_json_atomic(spec_path, {**spec, "cap_bytes": cap_bytes})
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(spec_path), str(out_path)]
    err_path = work_dir / f"stderr_{tag}.txt"
    t0 = time.perf_counter()
    killed = None
    watch_peak = 0
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, cwd=str(REPO_ROOT))
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            rss = _proc_status(proc.pid).get("VmRSS", 0)
            watch_peak = max(watch_peak, rss)
            if cap_bytes and rss > cap_bytes + 512 * 1024**2:
                killed = f"killed by the watchdog at {rss / GB:.2f} GB resident"
                os.kill(proc.pid, signal.SIGKILL)
            elif time.perf_counter() - t0 > timeout_s:
                killed = f"killed after the {timeout_s:.0f} s timeout"
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    child_peak = int(usage.ru_maxrss) * 1024
    if out_path.exists() and proc.returncode == 0:
        res = json.loads(out_path.read_text())
    else:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
        oom = killed is not None and "watchdog" in killed
        res = {"mode": spec["mode"], "n": spec["n"], "status": "oom" if oom else "failed",
               "error": killed or f"exit code {proc.returncode}: {' | '.join(tail)}", "peak_rss": child_peak}
    res.update(wall_s=round(wall, 2), wait4_peak_rss=child_peak, cap_bytes=cap_bytes)
    for p in (spec_path, out_path, err_path):
        if res.get("status") != "failed" or p is not err_path:
            p.unlink(missing_ok=True)
    logger.info("%s N=%d: %s, peak %.2f GB, step %s s, wall %.1f s", spec["mode"], spec["n"], res["status"],
                res.get("peak_rss", 0) / GB, res.get("step_s"), wall)
    return res


def _prepare(slide: Path, work_dir: Path, patch_size: int, backend: str) -> Path:
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, prepare_dataset

    out = work_dir / f"prepared_{slide.stem}_p{patch_size}"
    summary = prepare_dataset([SlideInput(str(slide), annotation=str(slide.with_suffix(".xml")), slide_id="bench")],
                              out, PrepareConfig(patch_size=patch_size, backend=backend), progress=False)
    if summary["failed"]:
        raise RuntimeError(f"preparing {slide} failed: {summary['failed']}")
    return out


def benchmark(quick: bool = False, sizes: Sequence[int] = (1000, 4000, 16000), patch_size: int = 64,
              sizes_224: Sequence[int] = (128,), chunk_size: int = 64, cap_gb: float = 12.0, threads: int = 2,
              slide_size: int = 11264, n_lumps: int = 16, seed: int = 7, device: str = "auto",
              work_dir: str | None = None, backend: str = "auto", skip_naive: bool = False,
              timeout_s: float = 1800.0, inprocess: bool | None = None, heap_trim: bool = True) -> dict:
    """Run every measurement and return the results (see :func:`run` for the arguments)."""
    if quick:
        sizes, patch_size, sizes_224, slide_size, n_lumps = (64, 128), 32, (), 1024, 3
    inprocess = bool(quick) if inprocess is None else bool(inprocess)

    def measure_one(spec: dict, cap: int | None) -> dict:
        if not inprocess:
            return run_child(spec, work, cap, timeout_s)
        t0 = time.perf_counter()
        out = measure({**spec, "cap_bytes": None})
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        return out

    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "monai_wsi_bench"
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    slide = cached_synthetic_slide(work, slide_size, patch_size, seed, n_lumps)
    groups = [(patch_size, None, [int(n) for n in sizes])]
    if sizes_224:
        groups.append((256, 224, [int(n) for n in sizes_224]))
    base = {"chunk_size": int(chunk_size), "threads": int(threads), "device": device, "seed": 0,
            "channels_last": True, "backend": backend, "heap_trim": bool(heap_trim)}
    res: dict = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "quick": bool(quick),
                 "inprocess": inprocess, "heap_trim": bool(heap_trim),
                 "machine": {"cpus": os.cpu_count(), "threads": int(threads), "python": platform.python_version(),
                             "omp_wait_policy": OMP_POLICY,
                             "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)},
                 "loadavg_before": [round(v, 2) for v in os.getloadavg()], "slide_size": slide_size,
                 "chunk_size": int(chunk_size), "cap_gb": cap_gb, "groups": []}
    cap_max = int(cap_gb * GB)
    for read_size, crop, ns in groups:
        prepared = _prepare(slide, work, read_size, backend)
        spec0 = {**base, "prepared_dir": str(prepared), "crop_size": crop}
        group = {"read_size": read_size, "crop_size": crop, "rows": [],
                 "idle": measure_one({**spec0, "mode": "idle", "n": ns[0]}, cap_max)}
        for n in ns:
            row = {"n": n, "e2e": measure_one({**spec0, "mode": "e2e", "n": n}, cap_max)}
            if skip_naive:
                row["naive"] = {"status": "skipped"}
            else:
                avail = _mem_available()
                cap = min(cap_max, int(avail - 2 * GB)) if avail else cap_max
                if cap < 2 * GB:
                    row["naive"] = {"status": "skipped", "error": f"only {avail / GB:.1f} GB available"}
                else:
                    row["naive"] = measure_one({**spec0, "mode": "naive", "n": n}, cap)
            group["rows"].append(row)
        res["groups"].append(group)
    try:
        from monai_wsi_ext.prep.prepare import load_prepared_slides

        res["slide_cells"] = {g["read_size"]: len(load_prepared_slides(_prepare(slide, work, g["read_size"],
                                                                                backend))[0].grid)
                              for g in res["groups"]}
    except Exception:  # noqa: BLE001 - informative only
        pass
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return res


def _ints(v) -> tuple[int, ...]:
    """A CLI value that may be one number or a list (fire gives ``--sizes 500`` as an int)."""
    if v is None or v == "":
        return ()
    return (int(v),) if isinstance(v, (int, float, str)) else tuple(int(x) for x in v)


def _gb(v) -> str:
    return f"{v / GB:.2f}"


def _mem_cell(r: dict) -> str:
    st = r.get("status")
    if st == "ok":
        s = _gb(r["peak_rss"])
        return s + (f" (CUDA {_gb(r['cuda_peak'])})" if r.get("cuda_peak") else "")
    if st == "oom":
        prog = r.get("progress") or {}
        where = f", {prog['encoded']} of {r['n']} patches encoded" if "encoded" in prog else ""
        cap = f" (cap {_gb(r['cap_bytes'])})" if r.get("cap_bytes") else ""
        return f"OOM at {_gb(r.get('peak_rss', 0))}{cap}{where}"
    if st == "skipped":
        return "not run" + (f" ({r['error']})" if r.get("error") else "")
    return f"failed ({r.get('error', '?')})"


def table(res: dict) -> str:
    """The Markdown result table of :func:`benchmark`."""
    lines = ["| N | patch (read -> input) | distinct cells | e2e peak RSS GB | naive peak RSS GB | e2e step s | "
             "naive step s | e2e / naive time | e2e loads: calls / patches / MB decoded | loss e2e / naive |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for g in res["groups"]:
        px = f"{g['read_size']} -> {g['crop_size'] or g['read_size']}"
        idle = g["idle"]
        lines.append(f"| idle | {px} | - | {_mem_cell(idle)} | (same child type) | - | - | - | - | - |")
        for row in g["rows"]:
            e, nv = row["e2e"], row["naive"]
            ratio = (f"{e['step_s'] / nv['step_s']:.2f}x" if e.get("status") == "ok" and nv.get("status") == "ok"
                     and nv.get("step_s") else "-")
            loads = (f"{e['load_calls']} / {e['patches_read']} / {e['decoded_bytes'] / 1024**2:.0f}"
                     if e.get("status") == "ok" else "-")
            losses = (f"{e['loss']:.5f} / {nv['loss']:.5f}" if e.get("status") == "ok" and nv.get("status") == "ok"
                      else "-")
            nstep = f"{nv['step_s']:.1f}" if nv.get("status") == "ok" else "-"
            estep = f"{e['step_s']:.1f}" if e.get("status") == "ok" else "-"
            lines.append(f"| {row['n']} | {px} | {e.get('distinct_cells', '-')} | {_mem_cell(e)} | {_mem_cell(nv)} | "
                         f"{estep} | {nstep} | {ratio} | {loads} | {losses} |")
    return "\n".join(lines)


def summary_lines(res: dict) -> list[str]:
    """Growth of the e2e peak over the first group's N range, and the gradient agreement of e2e and naive."""
    out = []
    g = res["groups"][0] if res["groups"] else None
    oks = [r for r in (g["rows"] if g else []) if r["e2e"].get("status") == "ok"]
    if len(oks) >= 2:
        lo, hi = oks[0]["e2e"], oks[-1]["e2e"]
        idle = g["idle"].get("peak_rss", 0)
        growth = hi["peak_rss"] / lo["peak_rss"] - 1
        out.append(f"- e2e peak RSS from N={lo['n']} to N={hi['n']} ({hi['n'] / lo['n']:.0f}x the patches): "
                   f"{_gb(lo['peak_rss'])} -> {_gb(hi['peak_rss'])} GB, **{growth:+.1%}** (goal <= +10 %); above "
                   f"the idle child ({_gb(idle)} GB): {_gb(lo['peak_rss'] - idle)} -> {_gb(hi['peak_rss'] - idle)} GB.")
        if hi["load_calls"] > lo["load_calls"]:
            per_call = (hi["peak_rss"] - lo["peak_rss"]) / (hi["load_calls"] - lo["load_calls"]) / 1024**2
            out.append(f"- e2e peak growth per extra load() call: {per_call:.2f} MB ({lo['load_calls']} -> "
                       f"{hi['load_calls']} calls; canvas {lo['canvas_size']} -> {hi['canvas_size']} cells).")
        naive = [r for r in g["rows"] if r["naive"].get("status") == "ok"]
        if len(naive) >= 2:
            a, b = naive[0]["naive"], naive[-1]["naive"]
            out.append(f"- naive peak RSS from N={a['n']} to N={b['n']}: {_gb(a['peak_rss'])} -> "
                       f"{_gb(b['peak_rss'])} GB ({(b['peak_rss'] - a['peak_rss']) / (b['n'] - a['n']) / 1024**2:.2f}"
                       " MB per extra patch).")
    agree = []
    for grp in res["groups"]:
        for r in grp["rows"]:
            e, nv = r["e2e"], r["naive"]
            if e.get("status") == "ok" and nv.get("status") == "ok" and nv.get("encoder_grad_norm"):
                agree.append(f"N={r['n']}: encoder grad norm {e['encoder_grad_norm']:.6g} vs "
                             f"{nv['encoder_grad_norm']:.6g}, U-Net {e['unet_grad_norm']:.6g} vs "
                             f"{nv['unet_grad_norm']:.6g}")
    if agree:
        out.append("- Both compute the same step (same weights, pixels and augmentation seeds): " + "; ".join(agree)
                   + ".")
    for grp in res["groups"]:
        for r in grp["rows"]:
            e = r["e2e"]
            if e.get("status") == "ok":
                out.append(f"- e2e N={r['n']} ({grp['read_size']} px reads): load() called {e['load_calls']} times "
                           f"for {e['patches_read']} patches (= 2 x N: every patch read once per pass, none kept), "
                           f"{e['rchar'] / 1024**2:.0f} MB read by the process during the step.")
    return out


def markdown(res: dict, command: str) -> str:
    """The ``BENCHMARKS.md`` section of a :func:`benchmark` result."""
    m = res["machine"]
    cells = res.get("slide_cells", {})
    cell_note = ", ".join(f"{c} tissue cells at {px} px" for px, c in cells.items())
    readers = sorted({r["e2e"].get("reader") for g in res["groups"] for r in g["rows"] if r["e2e"].get("reader")})
    title = "## End-to-end step memory (CPU)"
    if not res.get("heap_trim", True):
        title += ", without the heap trim before each read"
    out = [title, "",
           f"Command: `{command}`  ",
           f"Date: {res['date']}; {m['cpus']} CPUs, {m['mem_total_gb']} GB RAM (shared), torch threads {m['threads']}, "
           f"Python {m['python']}, `OMP_WAIT_POLICY={m['omp_wait_policy']}`; wall time {res['wall_s']} s; load average "
           f"{res['loadavg_before']} before, {res['loadavg_after']} after."]
    if res["quick"]:
        out += ["", "**Quick smoke run (tiny sizes): the numbers say nothing about memory or speed.**"]
    if not res.get("heap_trim", True):
        out += ["", "**Comparison run with `--heap_trim False`: `monai_wsi_ext.data.patches._release_free_heap` (the "
                "`malloc_trim(0)` before each `SlidePatchSource.read_raw`) replaced by a no-op in every child.**"]
    if res.get("inprocess"):
        out += ["", "**Measured in one process (no subprocesses, no memory cap): peak RSS is cumulative over the "
                "rows.**"]
    out += ["", f"One generated {res['slide_size']} x {res['slide_size']} px slide ({cell_note}); the first N cells "
            "are used and repeat when N exceeds the slide's cells (column \"distinct cells\"); slide reader: "
            f"{', '.join(readers) or '?'}. GoogLeNet "
            "`PatchEncoder` (eval mode, channels_last) + the bundle's MONAI UNet (`common.json#unet_def`) on a square "
            "canvas of side ceil(sqrt(N)) rounded up to 16, the paper's augmentation replayed from per-patch seeds, "
            f"chunk size {res['chunk_size']}. Each value is one step in its own subprocess; peak RSS is that "
            "process's `ru_maxrss` (it includes the ~1 GB of the torch import: see the idle row, a child that "
            "imports, builds the models, opens the slide and runs one warm-up chunk through encoder and U-Net with "
            "gradients; at 224 px that one chunk is most of the e2e step's memory, which chunk_size sets). Naive = "
            "every patch in memory "
            "and the graph of all N kept, one backward. Children run under a memory cap of "
            f"{res['cap_gb']} GB (`RLIMIT_AS` + a watchdog); \"OOM at X\" is the peak reached before the allocation "
            "failed. Step times are single runs: noisy when other jobs share the machine (see the load average).", "",
            table(res),
            ""]
    out += summary_lines(res)
    return "\n".join(out)


def run(quick: bool = False, sizes: Sequence[int] = (1000, 4000, 16000), patch_size: int = 64,
        sizes_224: Sequence[int] = (128,), chunk_size: int = 64, cap_gb: float = 12.0, threads: int = 2,
        slide_size: int = 11264, n_lumps: int = 16, seed: int = 7, device: str = "auto", work_dir: str | None = None,
        backend: str = "auto", skip_naive: bool = False, timeout_s: float = 1800.0, inprocess: bool | None = None,
        heap_trim: bool = True, write_md: str | None = None, output_json: str | None = None) -> None:
    """Measure peak memory and step time of the end-to-end step against naive back-propagation; print a table.

    Args:
        quick: tiny smoke run (N = 64, 128 with 32 px patches on a 1024 px slide, no 224 px point).
        sizes: numbers of patches at ``patch_size``.
        patch_size: read size (no crop) of the first group.
        sizes_224: numbers of patches read at 256 px and randomly cropped to 224 (the real input size); () skips.
        chunk_size: patches per encoder call (both methods).
        cap_gb: memory cap of every child (lowered to the available memory minus 2 GB for naive children).
        threads: ``torch.set_num_threads`` in the children.
        slide_size: side of the generated slide (11264 px holds about 11.5k tissue cells of 64 px).
        n_lumps: tissue lumps of the generated slide.
        seed: slide seed.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        work_dir: where the slide and prepared grids go (default ``<tmp>/monai_wsi_bench``; reused between runs).
        backend: slide reader backend.
        skip_naive: only run the e2e and idle children.
        timeout_s: per-child time limit.
        inprocess: measure in this process instead of one subprocess per measurement (default: only with
            ``quick``); peak memory is then cumulative and no cap applies.
        heap_trim: False runs the children without the heap trim ``SlidePatchSource.read_raw`` does before each
            read (for comparison; written to the section ``bench_e2e_memory_no_heap_trim``).
        write_md: Markdown file to insert/replace this benchmark's section in (e.g. ``BENCHMARKS.md``).
        output_json: also write the raw results here.
    """
    setup_logging("INFO")
    res = benchmark(quick, _ints(sizes), patch_size, _ints(sizes_224), chunk_size,
                    cap_gb, threads, slide_size, n_lumps, seed, device, work_dir, backend, skip_naive, timeout_s,
                    inprocess, heap_trim)
    command = "python scripts/bench_e2e_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = markdown(res, command.strip())
    print(md)
    if output_json:
        write_json_atomic(output_json, res)
    if write_md:
        marker = MARKER if heap_trim else f"{MARKER}_no_heap_trim"
        replace_section(write_md, marker, md)
        print(f"\nwrote the '{marker}' section of {write_md}")


if __name__ == "__main__":
    fire.Fire({"run": run, "child": child})
