"""Label-budget experiment: random init vs autoencoder vs SimCLR pretraining at 1 %, 10 % and 100 % of the labelled
training patches, classifier and canvas U-Net on held-out generated slides (bundle/docs/encoders.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import fire  # noqa: E402

from monai_wsi_ext.testing.label_budget import markdown, run_label_budget  # noqa: E402
from monai_wsi_ext.utils import setup_logging  # noqa: E402

__all__ = ["main"]


def main(output_dir: str = "label_budget_output", preset: str = "default", seed: int = 0, backbone: str | None = None,
         budgets: tuple | None = None, inits: tuple | None = None, canvas: bool | None = None,
         canvas_budget: bool = False, threads: int | None = None, log_level: str = "INFO") -> None:
    """Run the experiment and print its table (also in ``<output_dir>/results.md``).

    Example: ``python scripts/label_budget.py --output_dir /tmp/budget --threads 1``;
    ``--preset quick`` is the tests' smoke size.

    Args:
        output_dir: slides, prepared grids, checkpoints, heatmaps and results go here.
        preset: ``default`` or ``quick`` (``monai_wsi_ext.testing.label_budget.PRESETS``).
        seed: slide generator and training seed.
        backbone: encoder backbone (default: the preset's; ``quick`` uses ``small_cnn``).
        budgets: label fractions, e.g. ``"(0.01, 0.1, 1.0)"``.
        inits: encoder starts among ``random``, ``autoencoder``, ``simclr``.
        canvas: also train and score the canvas U-Net on each encoder's features.
        canvas_budget: the canvas U-Net trains on the encoder's label budget too (``canvas_label_fraction``); by
            default it trains on every training label.
        threads: torch threads (default: torch's).
        log_level: logging level.
    """
    setup_logging(log_level)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    result = run_label_budget(output_dir, preset=preset, seed=seed, backbone=backbone,
                              budgets=list(budgets) if budgets is not None else None,
                              inits=list(inits) if inits is not None else None, canvas=canvas,
                              canvas_budget=canvas_budget)
    print(markdown(result))


if __name__ == "__main__":
    fire.Fire(main)
