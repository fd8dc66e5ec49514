"""Write a small synthetic H&E-like dataset (pyramidal TIFFs, ASAP XML, GeoJSON, truth masks, manifest.json)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import fire  # noqa: E402

from monai_wsi_ext.testing.synthetic import generate_dataset  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402

__all__ = ["main"]


def main(output_dir: str = "demo_data", n_train: int = 4, n_val: int = 1, n_test: int = 2, seed: int = 0,
         width: int = 4096, height: int = 4096, overwrite: bool = False, **knobs) -> None:
    """Generate synthetic slides and print the path of their manifest.

    Slides already present with the same seed and settings are kept unless ``--overwrite``. Example:
    ``python scripts/make_demo_slides.py --output_dir demo_data --width 2048 --height 2048 --tumor_points 0``.

    Args:
        output_dir: output folder; slides go to ``<output_dir>/slides``, the manifest to
            ``<output_dir>/manifest.json``.
        n_train: number of training slides.
        n_val: number of validation slides.
        n_test: number of test slides.
        seed: dataset seed (the same seed gives byte-identical files).
        width: level-0 width of each slide in pixels.
        height: level-0 height of each slide in pixels.
        overwrite: rewrite slides that are already present.
        knobs: any other ``SyntheticSlideConfig`` field, e.g. ``--tumor_points 0``,
            ``--normal_looking_tumor_fraction 0.2``, ``--patch_size 128``, ``--nucleus_radius "(3, 6)"``,
            ``--tumor_regions 3``, ``--mpp 0.25``, ``--jpeg_quality 90``.
    """
    if knobs.pop("help", False):  # fire passes ``--help`` into **knobs; show this docstring instead
        print(main.__doc__)
        return
    setup_logging("INFO")
    manifest = generate_dataset(output_dir, n_train=int(n_train), n_val=int(n_val), n_test=int(n_test),
                                seed=int(seed), overwrite=bool(overwrite), width=int(width), height=int(height),
                                **knobs)
    print(manifest)


if __name__ == "__main__":
    fire.Fire(main)
