"""Synthetic datasets with tumor-free slides mixed in, for the slide-level methods (slide CNN, heatmap
aggregation, the hierarchical gate), which need both slide classes in every split.

:func:`generate_mixed_dataset` writes :func:`~monai_wsi_ext.testing.synthetic.generate_slide` slides in the layout of
:func:`~monai_wsi_ext.testing.synthetic.generate_dataset` (``<out_dir>/slides/<split>_<index>.tif``, sidecars,
``manifest.json``); in each split the last ``round(n * tumor_free_fraction)`` slides have no tumor region
(``tumor_regions=0``: an empty annotation; the tumor-looking spots of normal tissue stay, so a tumor-free slide is
not simply a clean one), flagged ``tumor_free`` in the manifest.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsi_ext.errors import ConfigError
from monai_wsi_ext.io.atomic import write_json_atomic
from monai_wsi_ext.testing.synthetic import _SPLITS, SyntheticSlideConfig, _existing_record, generate_slide

__all__ = ["tumor_free_flags", "generate_mixed_dataset"]


def tumor_free_flags(n: int, fraction: float) -> list[bool]:
    """Which of ``n`` slides are tumor-free: the last ``round(n * fraction)``."""
    k = int(math.floor(n * float(fraction) + 0.5))
    return [i >= n - k for i in range(n)]


def generate_mixed_dataset(out_dir: str | os.PathLike, n_train: int = 4, n_val: int = 2, n_test: int = 4,
                           seed: int = 0, tumor_free_fraction: float = 0.5, **config_overrides: Any) -> Path:
    """Write a synthetic dataset whose splits mix tumor and tumor-free slides; returns ``manifest.json``.

    Args:
        out_dir: output folder.
        n_train, n_val, n_test: slides per split.
        seed: dataset seed (each slide's seed comes from ``(seed, split, index)``).
        tumor_free_fraction: share of tumor-free slides per split.
        config_overrides: :class:`~monai_wsi_ext.testing.synthetic.SyntheticSlideConfig` fields.

    Raises:
        ConfigError: bad counts, fraction or config fields.
    """
    if not 0.0 <= float(tumor_free_fraction) <= 1.0:
        raise ConfigError(f"`tumor_free_fraction` must be in [0, 1], got {tumor_free_fraction!r}.")
    known = {f.name for f in dataclasses.fields(SyntheticSlideConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ConfigError(f"generate_mixed_dataset: unknown SyntheticSlideConfig field(s) {unknown}.")
    base = SyntheticSlideConfig(**config_overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    records = []
    for split_index, split in enumerate(_SPLITS):
        n = counts[split]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"generate_mixed_dataset: `n_{split}` must be a non-negative integer, got {n!r}.")
        for i, free in enumerate(tumor_free_flags(n, tumor_free_fraction)):
            cfg = dataclasses.replace(base, tumor_regions=0) if free else base
            slide_seed = int(np.random.SeedSequence([int(seed), split_index, i, 12]).generate_state(1)[0])
            path = out_dir / "slides" / f"{split}_{i:03d}.tif"
            record = _existing_record(path, slide_seed, cfg, out_dir) or generate_slide(path, slide_seed, cfg,
                                                                                        relative_to=out_dir)
            record.update(split=split, tumor_free=bool(free))
            records.append(record)
    manifest = {"name": "synthetic slides with tumor-free slides (monai_wsi_ext.testing.slide_sets)", "version": 1,
                "seed": int(seed), "config": base.to_dict(), "tumor_free_fraction": float(tumor_free_fraction),
                "splits": {s: [r["id"] for r in records if r["split"] == s] for s in _SPLITS}, "slides": records}
    return write_json_atomic(out_dir / "manifest.json", manifest)
