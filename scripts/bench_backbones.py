"""Patch-encoder backbones on this CPU: parameters, inference and training patches/s, as ratios against GoogLeNet
(the paper's) measured in the same run (bundle/docs/encoders.md, BENCHMARKS.md section ``bench_backbones``).

Each backbone is built as the bundle builds it (``PatchEncoder(backbone)``, random weights, channels_last) and timed
on random 224 px (or ``--size``) patches: inference = ``features`` + ``head`` under ``torch.inference_mode`` in eval
mode; training = forward, cross-entropy, backward and an Adam step in train mode. Every round times every backbone
once in turn, so load from other processes hits all of them alike; the best round is reported.

    python scripts/bench_backbones.py run --write_md BENCHMARKS.md
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from monai_wsi_ext.testing.bench import passive_omp_policy, replace_section  # noqa: E402

OMP_POLICY = passive_omp_policy()  # before torch is imported

import fire  # noqa: E402
import torch  # noqa: E402

from monai_wsi_ext.io.atomic import write_json_atomic  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402

BACKBONES = ("googlenet", "densenet121", "resnet18", "resnet34", "resnet50", "vgg16_bn", "efficientnet_b0",
             "mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny", "monai:efficientnet-b0", "small_cnn")


def _encoder(name: str) -> torch.nn.Module:
    from monai_wsi_ext.model.networks import PatchEncoder

    torch.manual_seed(0)
    return PatchEncoder(name).to(memory_format=torch.channels_last)


def _time_inference(enc: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    enc.eval()
    with torch.inference_mode():
        enc(x[:batch])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            enc(x[i:i + batch])
        return len(x) / (time.perf_counter() - t)


def _time_training(enc: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    enc.train()
    opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
    y = torch.arange(len(x)) % 2

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(enc(x[i:i + batch]), y[i:i + batch])
        loss.backward()
        opt.step()

    step(0)  # warm-up
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        step(i)
    return len(x) / (time.perf_counter() - t)


def run(backbones: str | tuple = BACKBONES, size: int = 224, batch: int = 16, patches: int = 32, rounds: int = 2,
        threads: int | None = None, write_md: str | None = None, output_json: str | None = None) -> dict:
    """Time every backbone; print the table and optionally write it into ``write_md`` and ``output_json``.

    Args:
        backbones: names (comma-separated or a tuple); the first is the baseline of the ratios.
        size: patch side in px.
        batch: batch size.
        patches: patches per backbone, mode and round (a multiple of ``batch``).
        rounds: rounds; each times every backbone once.
        threads: torch threads (default: every core).
        write_md: Markdown file whose ``bench_backbones`` section is replaced.
        output_json: raw results.
    """
    setup_logging("INFO")
    names = [b.strip() for b in backbones.split(",")] if isinstance(backbones, str) else list(backbones)
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    x = torch.rand(int(patches), 3, int(size), int(size)).contiguous(memory_format=torch.channels_last)
    params = {}
    best: dict[str, dict[str, float]] = {n: {"inference": 0.0, "training": 0.0} for n in names}
    for r in range(int(rounds)):
        for name in names:
            enc = _encoder(name)
            params[name] = sum(p.numel() for p in enc.backbone.parameters())
            inf = _time_inference(enc, x, int(batch))
            train = _time_training(enc, x, int(batch))
            best[name]["inference"] = max(best[name]["inference"], inf)
            best[name]["training"] = max(best[name]["training"], train)
            print(f"round {r + 1}: {name}: inference {inf:.1f} patches/s, training {train:.1f} patches/s", flush=True)
    base = best[names[0]]
    rows = ["| backbone | backbone parameters | inference patches/s (vs " + names[0] + ") | training patches/s (vs "
            + names[0] + ") |", "|---|---:|---:|---:|"]
    for name in names:
        b = best[name]
        rows.append(f"| `{name}` | {params[name] / 1e6:.2f} M | {b['inference']:.1f} "
                    f"({b['inference'] / base['inference']:.2f}x) | {b['training']:.1f} "
                    f"({b['training'] / base['training']:.2f}x) |")
    table = "\n".join(rows)
    print(table)
    wall = time.perf_counter() - t0
    result = {"size": size, "batch": batch, "patches": patches, "rounds": rounds, "threads": torch.get_num_threads(),
              "params": params, "best": best, "wall_s": wall, "load_before": load_before,
              "load_after": os.getloadavg()}
    if output_json:
        write_json_atomic(output_json, result)
    if write_md:
        cmd = "python scripts/bench_backbones.py run --write_md BENCHMARKS.md"
        body = (f"## Encoder backbones (CPU)\n\nCommand: `{cmd}`  \n"
                f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, torch "
                f"{torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}, "
                f"`OMP_WAIT_POLICY={OMP_POLICY}`; wall time {wall:.0f} s; load average (1/5/15 min) "
                f"{[round(v, 2) for v in load_before]} before, {[round(v, 2) for v in os.getloadavg()]} after.\n\n"
                f"`PatchEncoder(<backbone>)` with random weights in channels_last on random {size} px patches, batch "
                f"{batch}, {patches} patches per cell and round, best of {rounds} rounds taken in turn (load from "
                f"other processes hits every backbone alike, but ratios can still move by 10-20 %). Inference: "
                f"eval mode, `torch.inference_mode`, `features` + `head`; training: train mode, forward, "
                f"cross-entropy, backward and an Adam step.\n\n{table}\n")
        replace_section(write_md, "bench_backbones", body)
    return result


def _cli_run(*args, **kwargs) -> None:
    run(*args, **kwargs)  # fire would print the returned dict as a command group


_cli_run.__doc__ = run.__doc__

if __name__ == "__main__":
    fire.Fire({"run": _cli_run})
