"""Helpers shared by the benchmark scripts in ``scripts/``: a cached synthetic benchmark slide and Markdown sections
that each script owns inside ``BENCHMARKS.md``."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from monai_wsi_ext.io.atomic import write_json_atomic, write_text_atomic

__all__ = ["cached_synthetic_slide", "passive_omp_policy", "replace_section"]

logger = logging.getLogger(__name__)


def passive_omp_policy() -> str:
    """Ask OpenMP threads to sleep rather than spin while waiting (``OMP_WAIT_POLICY=PASSIVE``, unless already set).

    Spinning threads fight the slide decoder threads and any other process for the cores; on this project's 2-core
    machine that slowed torch 5-10x whenever the cores were shared. Must run before torch is imported.

    Returns:
        the policy in force, with a remark when torch was already loaded (the setting then has no effect).
    """
    import sys

    if "torch" in sys.modules:
        return f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} (torch loaded before this script)"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ["OMP_WAIT_POLICY"]


def cached_synthetic_slide(work_dir: str | os.PathLike, size: int, patch_size: int, seed: int, n_lumps: int = 3,
                           tumor_regions: int = 3) -> Path:
    """Generate a ``size`` x ``size`` synthetic slide once and reuse it while the seed and settings are unchanged
    (a JSON stamp next to the slide records them)."""
    from monai_wsi_ext.testing.synthetic import SyntheticSlideConfig, generate_slide

    work_dir = Path(work_dir)
    cfg = SyntheticSlideConfig(width=size, height=size, patch_size=patch_size, n_lumps=n_lumps,
                               tumor_regions=tumor_regions)
    path = work_dir / f"slide_{size}_{patch_size}_{n_lumps}_{seed}.tif"
    stamp = path.with_suffix(".json")
    want = {"seed": seed, "config": cfg.to_dict()}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    t0 = time.perf_counter()
    generate_slide(path, seed, cfg)
    write_json_atomic(stamp, want)
    logger.info("generated %s in %.1f s", path, time.perf_counter() - t0)
    return path


def replace_section(path: str | os.PathLike, marker: str, body: str, title: str = "# Benchmarks") -> Path:
    """Insert or replace the text between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in a Markdown
    file, leaving everything else as it is (the file is created with ``title`` when absent; a new section is
    appended at the end).

    Raises:
        ValueError: only one of the two markers is present.
    """
    path = Path(path)
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end):]
    elif i >= 0 or j >= 0:
        raise ValueError(f"{path}: only one of the markers {start!r}/{end!r} is present; fix the file by hand.")
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)
    return path


def publish(md: str, result: Any, marker: str, write_md: str | os.PathLike | None = None,
            output_json: str | os.PathLike | None = None) -> None:
    """The end of a benchmark script: print the Markdown, write the raw results to ``output_json`` and replace the
    ``marker`` section of ``write_md`` (:func:`replace_section`), each when given."""
    print(md)
    if output_json:
        write_json_atomic(output_json, result)
    if write_md:
        replace_section(write_md, marker, md)
        print(f"\nwrote the '{marker}' section of {write_md}")
