"""Assemble what ``monai-deploy package`` needs to build a MONAI Application Package (MAP) of the Deploy application.

Example::

    python scripts/build_map_app.py build --output_dir build/map_app --models models --models_out build/map_models
    monai-deploy package build/map_app -c build/map_app/app.yaml -m build/map_models -t wsi-canvas:0.1.0 \\
        --platform x86_64
"""

from __future__ import annotations

import fire

from monai_wsi_ext.deploy.package import build_map_app, named_model_folder
from monai_wsi_ext.utils import setup_logging

__all__ = ["main"]


def main(output_dir: str = "build/map_app", models: str | None = None, models_out: str = "build/map_models",
         suffix: str | None = None, overwrite: bool = False) -> dict:
    """Write the application folder (``__main__.py``, ``app.yaml``, ``requirements.txt``, a copy of
    ``monai_wsi_ext``) to ``output_dir`` and, with ``models`` (an export folder), the named model layout
    ``<models_out>/encoder/<file>``, ``<models_out>/unet/<file>``.

    Args:
        output_dir: the app folder.
        models: export folder of ``scripts/export_bundle.py`` (optional).
        models_out: where the named model layout goes.
        suffix: ``""`` or ``"_e2e"`` when the export folder holds both trainings.
        overwrite: replace an existing app folder.
    """
    setup_logging("INFO")
    app = build_map_app(output_dir, overwrite=overwrite)
    out = {"app": str(app)}
    if models is not None:
        out["models"] = {k: str(v) for k, v in named_model_folder(models, models_out, suffix).items()}
    print(f"monai-deploy package {app} -c {app / 'app.yaml'} -m {models_out if models else '<models>'} "
          "-t wsi-canvas:0.1.0 --platform x86_64")
    return out


if __name__ == "__main__":
    fire.Fire({"build": main})
