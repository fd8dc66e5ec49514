"""Write a dataset of one slide family (synthetic, texture or cells): pyramidal TIFFs, ASAP XML, GeoJSON, truth
masks and manifest.json, in the layout of make_demo_slides.py (see bundle/docs/slide_families.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import fire  # noqa: E402

from monai_wsi_ext.testing.families import FAMILIES, generate_family_dataset  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402

__all__ = ["main"]


def main(family: str = "texture", out_dir: str = "family_data", n_train: int = 4, n_val: int = 2, n_test: int = 3,
         seed: int = 0, overwrite: bool = False, tumor_free_fraction: float = 1 / 3,
         mpps: tuple = (0.25, 0.5, 1.0), **knobs) -> None:
    """Generate the slides of one family and print the path of their manifest.

    Slides already present with the same seed and settings are kept unless ``--overwrite``. Examples:
    ``python scripts/make_family_slides.py --family texture --out_dir data_texture --seed 0``,
    ``python scripts/make_family_slides.py --family cells --out_dir data_cells --mpps "(0.25, 1.0)"``,
    ``python scripts/make_family_slides.py --family synthetic --out_dir data_synthetic --width 2048 --height 2048``.

    Args:
        family: one of ``synthetic``, ``texture``, ``cells``.
        out_dir: output folder; slides go to ``<out_dir>/slides``, the manifest to ``<out_dir>/manifest.json``.
        n_train: number of training slides.
        n_val: number of validation slides.
        n_test: number of test slides.
        seed: dataset seed (the same seed gives byte-identical files).
        overwrite: rewrite slides that are already present.
        tumor_free_fraction: share of tumor-free slides per split (texture, cells).
        mpps: level-0 µm/px values the cells slides cycle through.
        knobs: fields of the family's settings: ``SyntheticSlideConfig`` (synthetic), ``TextureFamilyConfig``
            (texture: e.g. ``--width 4096 --source_dir ../shared/data --tumor_points 8``) or ``CellsFamilyConfig``
            (cells: e.g. ``--width 2048`` (µm at 1 µm/px) ``--patch_size 64 --false_tumor 12``).
    """
    if knobs.pop("help", False):  # fire passes ``--help`` into **knobs; show this docstring instead
        print(main.__doc__)
        return
    if family not in FAMILIES:
        raise SystemExit(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    setup_logging("INFO")
    extra = {} if family == "synthetic" else {"tumor_free_fraction": float(tumor_free_fraction),
                                              "mpps": tuple(float(m) for m in (mpps if isinstance(mpps, (list, tuple))
                                                                               else [mpps]))}
    manifest = generate_family_dataset(out_dir, family, n_train=int(n_train), n_val=int(n_val), n_test=int(n_test),
                                       seed=int(seed), overwrite=bool(overwrite), **extra, **knobs)
    print(manifest)


if __name__ == "__main__":
    fire.Fire(main)
