"""Distributed inference benchmark: ``multi_gpu_inference.json`` under ``torchrun`` with 2 CPU processes (gloo, one
thread each) against 1 process on the same cores (2 threads, and 1 thread), on the same generated slides.

Each configuration runs the same command (``torchrun --standalone --nproc_per_node=P -m monai.bundle run`` with the
overlay) into a fresh output folder; the rounds alternate the configurations. Reported: the command's wall time
(process start, model loading, the slides, the merged summary) and the slide loop's time (the longest rank's time
from its start to its last slide, from the merged summary's ``distributed.ranks[].seconds``). Ratios are against
1 process with 2 threads, measured in the same run.

Example:
    python scripts/bench_distributed.py                              # 8 slides of 1536 px, 2 rounds
    python scripts/bench_distributed.py --write_md BENCHMARKS.md     # also update its section
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SECTION_TITLE = "## Distributed inference, 2 CPU processes vs 1 (scripts/bench_distributed.py)"
#: (label, processes, threads per process)
SETUPS = (("1 process, 2 threads", 1, 2), ("1 process, 1 thread", 1, 1), ("2 processes (gloo), 1 thread each", 2, 1))
BASELINE = SETUPS[0][0]


def _dataset(work: Path, n_slides: int, size: int) -> tuple[Path, Path]:
    import torch
    from monai.bundle import ConfigParser

    from monai_wsi_ext.prep.prepare import PrepareConfig, collect_inputs, prepare_dataset
    from monai_wsi_ext.testing.synthetic import generate_dataset

    manifest = generate_dataset(work / "data", n_train=0, n_val=0, n_test=n_slides, seed=11, width=size, height=size,
                                patch_size=64, n_lumps=3)
    summary = prepare_dataset(collect_inputs(manifest=manifest), work / "prepared",
                              PrepareConfig(patch_size=64, thumbnail_max_size=512), progress=False)
    if summary["failed"]:
        raise RuntimeError(f"preparing the benchmark slides failed: {summary['failed']}")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(REPO / "configs" / "datasets" / "demo.json")])
    models = work / "models"
    models.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("encoder_def").state_dict(), models / "encoder.pt")
    torch.save(parser.get_parsed_content("unet_def").state_dict(), models / "unet.pt")
    return work / "prepared", models


def _command(procs: int, prepared: Path, models: Path, out: Path) -> list[str]:
    files = [str(CONFIGS / n) for n in ("common.json", "inference.json", "multi_gpu_inference.json")]
    files.append(str(REPO / "configs" / "datasets" / "demo.json"))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
            "monai.bundle", "run", "--config_file", str(files), "--dataset_dir", str(prepared), "--ckpt_dir",
            str(models), "--output_dir", str(out), "--num_workers", "0"]


def _run(procs: int, threads: int, prepared: Path, models: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    res = subprocess.run(_command(procs, prepared, models, out), capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"benchmark run failed ({procs} x {threads}):\n{res.stderr[-3000:]}")
    summary = json.loads((out / "heatmaps" / "inference_summary.json").read_text())
    ranks = summary["distributed"]["ranks"]
    return {"wall_s": wall, "loop_s": max(r["seconds"] for r in ranks), "slides": len(summary["slides"]),
            "patches": [r["cost"] for r in ranks]}


def main(n_slides: int = 8, size: int = 1536, rounds: int = 2, work_dir: str | None = None,
         write_md: str | None = None) -> None:
    """Run the benchmark and print a Markdown table (and write it into ``write_md``'s section).

    Args:
        n_slides: generated slides (64 px patches).
        size: their side in pixels.
        rounds: rounds; each runs every configuration once, in turn.
        work_dir: where the slides and outputs go (default: a temporary folder).
        write_md: a Markdown file whose ``bench_distributed`` section is replaced.
    """
    work = Path(work_dir or tempfile.mkdtemp(prefix="bench_distributed_"))
    work.mkdir(parents=True, exist_ok=True)
    prepared, models = _dataset(work, n_slides, size)
    results: dict[str, list[dict]] = {label: [] for label, _, _ in SETUPS}
    for r in range(rounds):
        for label, procs, threads in SETUPS:
            out = work / f"out_{procs}x{threads}_{r}"
            results[label].append(_run(procs, threads, prepared, models, out))
            print(f"round {r + 1}: {label}: {results[label][-1]}", file=sys.stderr)
    load = os.getloadavg()
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "loop_s")} for k, v in results.items()}
    base = med[BASELINE]
    first = results[SETUPS[-1][0]][0]
    lines = [
        f"{first['slides']} generated {size} x {size} px slides, 64 px patches ({sum(first['patches']):.0f} tissue "
        f"patches; 2 ranks got {', '.join(f'{p:.0f}' for p in first['patches'])} patches), demo settings "
        "(GoogLeNet encoder, 56 px crop, random weights), canvas U-Net, heatmaps written.",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'scripts/bench_distributed.py', *sys.argv[1:]])}`",
        "",
        f"- Date: {_dt.date.today().isoformat()}",
        f"- Machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), no GPU; load average "
        f"after the run {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}"
        + (" (above the core count: other jobs shared the cores)" if load[0] > (os.cpu_count() or 1) else ""),
        f"- {rounds} round(s), each running every configuration once in turn; medians over the rounds",
        "",
        f"| configuration | command wall s | slide loop s (slowest rank) | speed-up (wall) vs {BASELINE} | speed-up (loop) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, _, _ in SETUPS:
        m = med[label]
        lines.append(f"| {label} | {m['wall_s']:.1f} | {m['loop_s']:.1f} | {base['wall_s'] / m['wall_s']:.2f}x | "
                     f"{base['loop_s'] / m['loop_s']:.2f}x |")
    body = "\n".join(lines)
    print(body)
    if write_md:
        from monai_wsi_ext.testing.bench import replace_section

        replace_section(write_md, "bench_distributed", f"{SECTION_TITLE}\n\n{body}")


if __name__ == "__main__":
    fire.Fire(main)
