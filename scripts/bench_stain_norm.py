"""Stain normalisation cost per patch on the CPU, against the encoder it feeds, and how much Vahadane's stain
matrix depends on its random initial dictionary.

What is measured, on the 16 real H&E patches of ``../shared/data/patches/crc`` (224 px, two per tissue class), the
target fitted on the first ``TUM`` patch:

- seconds per patch of: Macenko (MONAI ``NormalizeHEStains``, the ``stain_normalize`` patch transform), Reinhard and
  Vahadane (the encoder's ``input_stain_norm`` modules; Vahadane at each ``strides`` value, its stain matrix
  estimated on every ``stride``-th row and column), and the GoogLeNet encoder's forward (eager, channels_last,
  batch 16, the ratio reference). Each is the best of ``repeats`` rounds over all patches, after one warm-up;
- for Vahadane at each stride: the largest change of the patch's estimated stain matrix (unit H and E vectors)
  over ``seeds`` initial-dictionary seeds, as median and max over the patches, and the mean absolute pixel change
  of the normalised patch between the first two seeds.

Usage::

    python scripts/bench_stain_norm.py run --write_md BENCHMARKS.md --output_json /tmp/stain.json
    python scripts/bench_stain_norm.py run --quick      # smoke run: 2 patches, stride 8, 2 seeds, one round
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from monai_wsi_ext.testing.bench import passive_omp_policy  # noqa: E402 - no torch import behind it

OMP_POLICY = passive_omp_policy()

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from monai_wsi_ext.testing.bench import publish  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402

__all__ = ["MARKER", "measure", "markdown", "run"]

logger = logging.getLogger("bench_stain_norm")
MARKER = "bench_stain_norm"
DEFAULT_PATCHES = REPO_ROOT.parent / "shared" / "data" / "patches" / "crc"


def _patches(folder: Path, limit: int | None) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    files = sorted(Path(folder).glob("*.png"))[:limit]
    if not files:
        raise SystemExit(f"{folder}: no PNG patches")
    imgs = [np.asarray(Image.open(f).convert("RGB")).copy() for f in files]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0, [f.name for f in files]


def _best(fn, repeats: int, warm_up: bool = True) -> tuple[float, object]:
    """Best time of ``repeats`` calls (after one untimed call when ``warm_up``) and the last call's result."""
    if warm_up:
        fn()  # imports, first-call allocations
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(folder: str | os.PathLike = DEFAULT_PATCHES, strides: Sequence[int] = (8, 4, 1), seeds: int = 3,
            repeats: int = 2, limit: int | None = None, threads: int = 2) -> dict:
    """Run the measurements of the module docstring and return them as a dict."""
    from monai_wsi_ext.data.patches import StainNormalize
    from monai_wsi_ext.model.networks import PatchEncoder
    from monai_wsi_ext.model.normalization import (ReinhardNormalization, VahadaneNormalization,
                                                   fit_reinhard_target, fit_vahadane_target)

    torch.set_num_threads(int(threads))
    x, names = _patches(Path(folder), limit)
    n = len(x)
    ref = next((i for i, name in enumerate(names) if name.startswith("TUM")), 0)
    ref_img = (x[ref].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    rows: dict[str, float] = {}
    torch.manual_seed(0)
    enc = PatchEncoder("googlenet").eval().to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows["GoogLeNet encoder (eager, channels_last, batch 16)"] = _best(
            lambda: [enc(xc[i:i + 16]) for i in range(0, n, 16)], repeats)[0] / n
    mac = StainNormalize()
    hwc = [(p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in x]
    rows["Macenko (MONAI NormalizeHEStains, patch transform)"] = _best(lambda: [mac(p) for p in hwc], repeats)[0] / n
    rein = ReinhardNormalization(True)
    rein.set_target(*fit_reinhard_target(ref_img))
    with torch.no_grad():
        rows["Reinhard (encoder module)"] = _best(lambda: rein(x), repeats)[0] / n
    target = fit_vahadane_target(ref_img)
    spread = {}
    for stride in strides:
        vah = VahadaneNormalization(True, estimate_stride=int(stride))
        vah.set_target(*target)
        with torch.no_grad():  # no warm-up: fitting the target above already imported and ran the library
            seconds, first = _best(lambda: vah(x), repeats, warm_up=False)
            rows[f"Vahadane, stride {stride} (encoder module)"] = seconds / n
            mats = []
            for seed in range(max(2, int(seeds))):
                vah.seed = seed
                mats.append(torch.stack([_matrix(vah, x[i:i + 1]) for i in range(n)]))
            vah.seed = 1
            outs = [first, vah(x)]
        m = torch.stack(mats)  # seeds x patches x 2 x 3 (NaN: too little tissue)
        per_patch = (m.amax(0) - m.amin(0)).flatten(1).amax(1)
        per_patch = per_patch[~torch.isnan(per_patch)]
        nan = float("nan")
        spread[int(stride)] = {"median": float(per_patch.median()) if len(per_patch) else nan,
                               "max": float(per_patch.max()) if len(per_patch) else nan,
                               "pixel_change_between_seeds": float((outs[0] - outs[1]).abs().mean())}
    reference = rows["GoogLeNet encoder (eager, channels_last, batch 16)"]
    return {"n_patches": n, "folder": str(folder), "reference_patch": names[ref], "threads": int(threads),
            "omp_wait_policy": OMP_POLICY,
            "seconds_per_patch": rows, "ratio_to_encoder": {k: v / reference for k, v in rows.items()},
            "vahadane_seed_spread": spread, "vahadane_target": {"stain_matrix": target[0],
                                                                "max_concentration": target[1]},
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "date": datetime.date.today().isoformat(),
                        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}}


def _matrix(norm, patch: torch.Tensor) -> torch.Tensor:
    sm = norm._stain_matrix_of(patch, norm.estimate_stride)
    return torch.full((2, 3), float("nan")) if sm is None else sm[0]


def _load(values) -> str:
    return "n/a" if not values else " / ".join(f"{v:.2f}" for v in values)


def markdown(res: dict, command: str) -> str:
    out = ["## Stain normalisation cost (CPU)", "", f"Command: `{command}`", ""]
    if res.get("quick"):
        out += ["Quick smoke run: two patches, one round; it says nothing about speed.", ""]
    out += [
           f"{res['n_patches']} real H&E patches (`{Path(res['folder']).name}`), target fitted on "
           f"`{res['reference_patch']}`, {res['threads']} threads (OpenMP wait policy {res['omp_wait_policy']}), "
           "best of the rounds; Python {python}, torch {torch}, {cpus} CPUs, {date}, load average "
           "{load}.".format(**res["machine"], load=_load(res["machine"]["load_average"])), "",
           "| step | ms per patch | vs the GoogLeNet encoder |", "|---|---:|---:|"]
    for k, v in res["seconds_per_patch"].items():
        out.append(f"| {k} | {1000 * v:.1f} | {res['ratio_to_encoder'][k]:.2f}x |")
    out += ["", "Vahadane's stain matrix against the seed of its random initial dictionary (largest change of an H or "
                "E vector component over the seeds, per patch; mean absolute pixel change of the normalised patch "
                "between two seeds):", "", "| stride | median over patches | max | pixel change |",
            "|---:|---:|---:|---:|"]
    for stride, s in res["vahadane_seed_spread"].items():
        out.append(f"| {stride} | {s['median']:.3f} | {s['max']:.3f} | {s['pixel_change_between_seeds']:.4f} |")
    return "\n".join(out)


def run(quick: bool = False, folder: str = str(DEFAULT_PATCHES), strides: Sequence[int] = (8, 4, 1),
        seeds: int = 3, repeats: int = 2, threads: int = 2, write_md: str | None = None,
        output_json: str | None = None) -> None:
    """Measure and print the tables; ``write_md`` replaces this benchmark's section of a Markdown file."""
    setup_logging("INFO")
    strides = (strides,) if isinstance(strides, int) else tuple(int(s) for s in strides)
    if quick:
        strides, seeds, repeats, limit = (8,), 2, 1, 2
    else:
        limit = None
    res = measure(folder, strides, seeds, repeats, limit, threads)
    res["quick"] = bool(quick)
    res["command"] = ("python scripts/bench_stain_norm.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    publish(markdown(res, res["command"]), res, MARKER, write_md, output_json)


if __name__ == "__main__":
    fire.Fire({"run": run})
