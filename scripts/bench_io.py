"""Slide-reading benchmark: the project's patch path against raw cuCIM, OpenSlide and tiffslide on the same cells.

Example:
    python scripts/bench_io.py                                  # 20,000 x 20,000 synthetic slide, 256 px patches
    python scripts/bench_io.py --write_md BENCHMARKS.md         # also update the "Slide reading" section
    python scripts/bench_io.py --size 4096 --repeats 1          # a quick smoke run
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["main", "update_markdown_section"]

logger = logging.getLogger("bench_io")

SECTION_TITLE = "## Slide reading (scripts/bench_io.py)"
BASELINE = "raw cuCIM batch"


def update_markdown_section(path: str | os.PathLike, body: str) -> Path:
    """Replace this benchmark's marked section in ``path`` (appended, or the file created, when missing)."""
    from monai_wsi_ext.testing.bench import replace_section

    return replace_section(path, "bench_io", f"{SECTION_TITLE}\n\n{body.strip()}")


def _synthetic_slide(work_dir: Path, size: int, patch_size: int, seed: int) -> Path:
    """Generate (or reuse, when the same seed and settings were used) a ``size`` x ``size`` synthetic slide."""
    from monai_wsi_ext.testing.synthetic import generate_dataset

    root = work_dir / f"synthetic_{size}"
    start = time.perf_counter()
    manifest = generate_dataset(root, n_train=1, n_val=0, n_test=0, seed=seed, width=size, height=size,
                                patch_size=patch_size)
    logger.info("synthetic slide ready in %.1f s (%s)", time.perf_counter() - start, manifest)
    return root / "slides" / "train_000.tif"


class _NoOp:
    """A transform that leaves the pixels alone and returns one zero per patch: what remains of
    ``iter_batches`` is its reading machinery (one batched cuCIM read, read-ahead thread, queue)."""

    def __call__(self, patch: np.ndarray):
        import torch

        return torch.zeros(())

    def apply_batch(self, raw: np.ndarray, seeds=None):
        import torch

        return torch.zeros(len(raw))


def _methods(path: str, locs: np.ndarray, patch: int, num_workers: int, batch_size: int) -> dict[str, Callable]:
    """Name -> function reading every location once and returning the number of patches read."""
    from monai.utils import optional_import

    from monai_wsi_ext.data.patches import EvalTransform, SlidePatchSource
    from monai_wsi_ext.io.wsi import open_slide

    cucim_image, has_cucim = optional_import("cucim", name="CuImage")
    openslide, has_openslide = optional_import("openslide")
    tiffslide, has_tiffslide = optional_import("tiffslide")
    xy = [(int(x), int(y)) for x, y in locs]

    def ours_source(transform) -> Callable[[], int]:
        def run() -> int:
            source = SlidePatchSource(path, locs[:, 0], locs[:, 1], 0, patch, transform=transform, backend="cucim",
                                      num_workers=num_workers)
            n = 0
            for _, batch in source.iter_batches(batch_size=batch_size):
                n += len(batch)
            source.close()
            return n

        return run

    def ours_read_regions() -> int:
        n = 0
        with open_slide(path, backend="cucim") as slide:
            for batch in slide.read_regions(locs, patch, 0, num_workers=num_workers, batch_size=batch_size):
                n += len(batch)
        return n

    def raw_cucim() -> int:
        img = cucim_image(path)
        n = 0
        for batch in img.read_region(xy, (patch, patch), 0, num_workers=num_workers, batch_size=batch_size):
            n += np.asarray(batch).shape[0]
        return n

    def raw_openslide() -> int:
        slide = openslide.OpenSlide(path)
        for x, y in xy:
            slide.read_region((x, y), 0, (patch, patch))
        slide.close()
        return len(xy)

    def raw_tiffslide() -> int:
        slide = tiffslide.TiffSlide(path)
        for x, y in xy:
            slide.read_region((x, y), 0, (patch, patch), as_array=True)
        slide.close()
        return len(xy)

    with open_slide(path) as slide:  # one batch read once, converted over and over (the conversion alone)
        one_batch = next(slide.read_regions(locs[:batch_size], patch, 0, num_workers=num_workers,
                                            batch_size=batch_size))

    def conversion_only() -> int:
        transform, batch = EvalTransform(None), one_batch
        n = 0
        while n < len(locs):
            k = min(len(batch), len(locs) - n)
            transform.apply_batch(batch[:k])
            n += k
        return n

    methods = {}
    if has_cucim:
        methods[f"ours: SlidePatchSource.iter_batches, EvalTransform(None) (bs {batch_size})"] = ours_source(
            EvalTransform(None))
        methods[f"ours: SlidePatchSource.iter_batches, no-op transform (bs {batch_size})"] = ours_source(_NoOp())
        methods[f"ours: Slide.read_regions (bs {batch_size})"] = ours_read_regions
        methods[BASELINE] = raw_cucim
        methods["EvalTransform(None) alone: uint8 -> float32 CHW, no reading"] = conversion_only
    else:
        logger.warning("cuCIM is not installed: no baseline, no project path on cuCIM")
    if has_openslide:
        methods["raw OpenSlide read_region loop"] = raw_openslide
    if has_tiffslide:
        methods["raw tiffslide read_region loop"] = raw_tiffslide
    return methods


def _table(results: dict[str, list[float]], n_patches: int) -> str:
    """Markdown table: median and best rate per path, and the median over rounds of the rate divided by the raw
    cuCIM batch rate of the same round (neighbouring runs share the machine's load, so this ratio is steadier)."""
    base = results.get(BASELINE)
    lines = ["| path | patches | median patches/s | best patches/s | vs raw cuCIM batch (median of rounds) |",
             "|---|---:|---:|---:|---:|"]
    for name, rates in results.items():
        ratio = f"{float(np.median(np.divide(rates, base))):.2f}x" if base else "n/a"
        lines.append(f"| {name} | {n_patches} | {float(np.median(rates)):.0f} | {max(rates):.0f} | {ratio} |")
    return "\n".join(lines)


def _ratio(results: dict[str, list[float]], key: str) -> float | None:
    name = next((k for k in results if key in k), None)
    if name is None or BASELINE not in results:
        return None
    return float(np.median(np.divide(results[name], results[BASELINE])))


def main(
    size: int = 20000,
    patch_size: int = 256,
    slide: str | None = None,
    work_dir: str = "bench_output/io",
    num_workers: int = 2,
    batch_size: int = 64,
    repeats: int = 5,
    max_patches: int | None = None,
    seed: int = 0,
    write_md: str | None = None,
    log_level: str = "INFO",
) -> None:
    """Time reading the tissue patches of one slide through the project's path and through raw readers.

    The slide is a generated synthetic slide (reused when present) unless ``--slide`` is given. Its tissue cells
    come from ``prepare_slide`` (Otsu mask, 80 % tissue per cell); every path then reads those same cells at
    level 0, in table order:

    * ours: ``SlidePatchSource(...).iter_batches`` with ``EvalTransform(None)`` (what feature extraction uses:
      batched cuCIM reads in a background thread, uint8 -> float CHW), and ``Slide.read_regions`` directly;
    * raw cuCIM batch: ``CuImage.read_region(locations, (p, p), 0, num_workers, batch_size)``, iterated;
    * raw OpenSlide and tiffslide ``read_region`` loops (one patch at a time, one thread).

    The OS file cache is warmed by one untimed cuCIM pass; each path also gets a short untimed warm-up. The paths
    then run in turn, ``repeats`` rounds; the table gives the median and best rate of each and the median over
    rounds of its rate divided by the raw cuCIM rate of the same round (steadier on a shared machine).

    Args:
        size: side of the synthetic slide in pixels (ignored with ``slide``).
        patch_size: patch side in level-0 pixels.
        slide: benchmark this slide file instead of a synthetic one.
        work_dir: where the synthetic slide and the prepared grid go.
        num_workers: cuCIM decoder threads (ours and raw).
        batch_size: patches per batch (ours and raw cuCIM).
        repeats: rounds of timed runs (every path once per round).
        max_patches: use at most this many cells (evenly spread over the table); default all.
        seed: seed of the synthetic slide.
        write_md: a Markdown file (e.g. ``BENCHMARKS.md``) whose "Slide reading" section is replaced with the
            results, the command, the machine and the date.
        log_level: logging level.
    """
    from monai_wsi_ext.utils import setup_logging

    setup_logging(log_level)
    from monai_wsi_ext.prep.grid import read_patch_table
    from monai_wsi_ext.prep.prepare import PrepareConfig, SlideInput, prepare_slide
    from monai_wsi_ext.io.wsi import open_slide

    work = Path(work_dir)
    path = Path(slide) if slide is not None else _synthetic_slide(work, int(size), int(patch_size), int(seed))
    slide_id = path.stem
    start = time.perf_counter()
    meta = prepare_slide(SlideInput(image=str(path), slide_id=slide_id), work / "prepared",
                         PrepareConfig(patch_size=int(patch_size)))
    grid = read_patch_table(work / "prepared" / slide_id / "patches.csv")
    logger.info("%d tissue cells of %s in %.1f s", len(grid), meta["grid_shape"], time.perf_counter() - start)
    locs = np.stack([grid.x, grid.y], axis=1)
    if max_patches is not None and len(locs) > int(max_patches):
        locs = locs[np.linspace(0, len(locs) - 1, int(max_patches)).astype(int)]
    if len(locs) == 0:
        print(f"error: {path} has no tissue cells to read", file=sys.stderr)
        sys.exit(1)
    with open_slide(path) as s:
        geometry = (f"{s.dimensions[0]} x {s.dimensions[1]}, {s.level_count} levels, "
                    f"tiles {s.handle.resolutions['level_tile_sizes'][0] if s.backend == 'cucim' else '?'}, "
                    f"mpp {s.mpp}")

    methods = _methods(str(path), locs, int(patch_size), int(num_workers), int(batch_size))
    if BASELINE in methods:
        t = time.perf_counter()
        methods[BASELINE]()  # warms the OS file cache for every path
        logger.info("cache warm-up read in %.1f s", time.perf_counter() - t)
    warm = locs[: min(len(locs), int(batch_size))]
    for fn in _methods(str(path), warm, int(patch_size), int(num_workers), int(batch_size)).values():
        fn()  # library initialisation, thread pools
    results: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(max(int(repeats), 1)):
        for name, fn in methods.items():
            t = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t
            if n != len(locs):
                raise RuntimeError(f"{name} read {n} patches, expected {len(locs)}")
            logger.info("round %d  %-70s %6.2f s  %7.0f patches/s", r + 1, name, dt, n / dt)
            results[name].append(n / dt)
    table = _table(results, len(locs))
    print(table)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    if write_md:
        import cucim
        import openslide
        import tiffslide

        cmd = " ".join(["python", *map(shlex.quote, [os.path.relpath(sys.argv[0]) if sys.argv else "bench_io.py",
                                                    *sys.argv[1:]])])
        ours, reading = _ratio(results, "EvalTransform(None) (bs"), _ratio(results, "no-op")
        conversion = _ratio(results, "alone")
        body = "\n".join([
            f"Command: `{cmd}`",
            "",
            f"- Date: {_dt.date.today().isoformat()}",
            f"- Machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), load average after "
            f"the run {', '.join(f'{v:.1f}' for v in load) if load else 'n/a'} (above the core count: other jobs "
            "were running); no GPU (cuCIM decodes on the CPU)",
            f"- Slide: {path.name}, {geometry}, JPEG tiles"
            + (" (synthetic, `monai_wsi_ext.testing.synthetic`)" if slide is None else ""),
            f"- Patches: {len(locs)} tissue cells of {patch_size} x {patch_size} at level 0 (Otsu mask, >= 80 % "
            f"tissue), read in table order; {num_workers} decoder threads, batch {batch_size}",
            f"- Timing: OS cache warmed by one untimed pass, a short untimed warm-up per path, then {repeats} "
            "rounds in which every path runs once in turn",
            f"- Versions: cucim {cucim.__version__}, openslide-python {openslide.__version__} "
            f"(OpenSlide {openslide.__library_version__}), tiffslide {tiffslide.__version__}",
            "",
            table,
            "",
            "Rows: *iter_batches, EvalTransform(None)* is what feature extraction runs (batched cuCIM reads in a "
            "read-ahead thread, then uint8 -> float32 CHW in [0, 1]); *no-op transform* is the same path with a "
            "transform that leaves the pixels alone (the reading part); *Slide.read_regions* copies each batch out "
            "of cuCIM's reused buffers (its safe default); *EvalTransform(None) alone* converts one batch already in "
            "memory over and over (the conversion part).",
            "",
            (f"Reading through our path runs at {reading:.2f}x the raw cuCIM batch rate (goal >= 0.9x); with the "
             f"float conversion the path runs at {ours:.2f}x. The conversion alone, on one thread, runs at "
             f"{conversion:.2f}x the rate at which {num_workers} cuCIM threads decode these tiles, so on "
             f"{os.cpu_count()} cores decoding and converting share the same CPU. The conversion has to happen "
             "somewhere before the encoder; it is done once per batch in numpy, bit-identical to the per-patch "
             "transform.")
            if ours and reading and conversion else "",
        ])
        update_markdown_section(write_md, body)
        print(f"updated {write_md}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
