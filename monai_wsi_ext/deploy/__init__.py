"""Slide inference from exported TorchScript models, as a MONAI Deploy application.

:mod:`monai_wsi_ext.deploy.models` (no MONAI Deploy needed) finds and loads the ``encoder`` and ``unet``
TorchScript files that ``scripts/export_bundle.py`` writes, reads the tiling settings embedded in them, and runs
:class:`~monai_wsi_ext.inference.slides.SlideInference` with them. :mod:`monai_wsi_ext.deploy.app` wraps that in a MONAI
Deploy App SDK application (``pip install -e ".[deploy]"``)::

    python -m monai_wsi_ext.deploy -i <slides folder> -o <output folder> -m <models folder>
"""

from monai_wsi_ext.deploy.models import (
    ExportedModels,
    find_model_files,
    list_slides,
    load_exported_models,
    run_exported_inference,
)

__all__ = ["ExportedModels", "find_model_files", "list_slides", "load_exported_models", "run_exported_inference"]
