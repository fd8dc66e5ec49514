"""Batch inference over an archive of slides: only new or changed slides, with an index (CSV and JSON) of every slide.

Examples:
    # one process
    python scripts/batch_inference.py run --slides /archive/slides --output_dir /archive/results \\
        --ckpt_dir bundle/models
    # what would be done, without inferring
    python scripts/batch_inference.py plan --slides "/archive/2024-*/*.svs" --output_dir /archive/results
    # one process per GPU (or 2 CPU processes), the slides dealt out over them
    torchrun --standalone --nproc_per_node=2 scripts/batch_inference.py run --slides slides.csv \\
        --output_dir /archive/results --ckpt_dir bundle/models

Every other ``--key value`` is a bundle config override (``--ckpt_dir``, ``--encoder_ckpt``, ``--mode classifier``,
``--threshold``, ``--backend``, ``--canvas_size``...); ``--config_file`` adds overlays (a dataset overlay) after
``common.json``, ``inference.json`` and ``archive_inference.json``. See bundle/docs/scaling_out.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire

__all__ = ["run", "plan"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
BASE = [CONFIGS / "common.json", CONFIGS / "inference.json", CONFIGS / "archive_inference.json"]


def _files(config_file) -> list[str]:
    extra = [] if config_file is None else [config_file] if isinstance(config_file, str) else list(config_file)
    return [str(p) for p in BASE] + [str(p) for p in extra]


def run(slides: str, output_dir: str, config_file=None, checksum: str = "stat", log_level: str = "INFO",
        **overrides) -> None:
    """Infer the archive's new and changed slides (and those that failed before) and update the index.

    Args:
        slides: a folder (searched recursively), a glob pattern, or a CSV with an ``image`` column (and optionally
            ``slide_id``).
        output_dir: the archive's results: ``heatmaps/<slide_id>/``, ``index.csv``, ``index.json``,
            ``index_entries/``.
        config_file: overlay(s) layered after the bundle's inference configs.
        checksum: ``stat`` (size and modification time) or ``sha256`` (content) to tell a changed slide.
        log_level: logging level.
        overrides: bundle config overrides (``--ckpt_dir``, ``--mode`` ...).

    Exits with status 1 when a slide failed (the index says which and why).
    """
    from monai_wsi_ext.errors import MonaiWsiExtError
    from monai_wsi_ext.inference.archive import run_archive
    from monai_wsi_ext.utils import setup_logging

    setup_logging(log_level)
    try:
        result = run_archive(str(slides), output_dir, _files(config_file), overrides, checksum=checksum)
    except MonaiWsiExtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"listed": len(result["listed"]), "done_now": len(result["todo"]),
                          "counts": result["index"]["counts"], "index": str(Path(output_dir) / "index.csv")}))


def plan(slides: str, output_dir: str, config_file=None, checksum: str = "stat", log_level: str = "WARNING",
         **overrides) -> None:
    """Print the slides a ``run`` would infer and why (``new``, ``changed``, ``retry (failed)``, ``model or settings
    changed``, ``outputs missing``, ``moved``); nothing is written."""
    from monai_wsi_ext.inference.archive import run_archive
    from monai_wsi_ext.utils import setup_logging

    from monai_wsi_ext.errors import MonaiWsiExtError

    setup_logging(log_level)
    try:
        result = run_archive(str(slides), output_dir, _files(config_file), overrides, checksum=checksum, dry_run=True)
    except MonaiWsiExtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"listed": len(result["listed"]), "todo": result["todo"]}, indent=1))


if __name__ == "__main__":
    fire.Fire({"run": run, "plan": plan})
