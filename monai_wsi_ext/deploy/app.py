"""MONAI Deploy application: whole-slide images (files or DICOM WSI series) -> tumor heatmaps with the exported
canvas models, and DICOM results for DICOM slides.

Two operators in a DAG: :class:`SlideLoaderOperator` lists the slides of the input folder (slide files, and the
DICOM WSI series selected by the rule of :mod:`monai_wsi_ext.deploy.inputs`) and :class:`CanvasHeatmapOperator`
runs the encoder + canvas U-Net on them (:func:`monai_wsi_ext.deploy.models.run_exported_inference`), writing per
slide the probability map (``.npy`` + PNG), an aligned pyramidal heatmap TIFF, an overlay, a QuPath GeoJSON of tumor
regions, the slide score and a run record, for a DICOM slide also a DICOM Segmentation of the map and DICOM bulk
annotations of the regions (:mod:`monai_wsi_ext.outputs.dicom`), and ``inference_summary.json`` for the batch. A
slide that fails is listed there and the others go on; the application then ends with an error, so the exit status
tells a scheduler.

Run (``pip install -e ".[deploy]"``; the usual MONAI Deploy options and ``HOLOSCAN_*_PATH`` variables)::

    python -m monai_wsi_ext.deploy -i slides/ -o heatmaps/ -m models/

Options that are not paths come from environment variables: ``WSI_CANVAS_MODE`` (``canvas``/``classifier``),
``WSI_CANVAS_THRESHOLD`` (0.5), ``WSI_CANVAS_BATCH_SIZE`` (16 on the CPU, 64 on a GPU),
``WSI_CANVAS_BACKEND`` (``auto``),
``WSI_CANVAS_MPP`` (level-0 µm/px for slides without it), ``WSI_CANVAS_MODEL_SUFFIX`` (``""`` or ``_e2e``),
``WSI_CANVAS_DEVICE`` (``auto``), ``WSI_CANVAS_ITK_FORMAT`` (``nrrd`` or ``mha``: also write each map as
an ITK image with physical spacing; needs the ``itk`` extra), and for DICOM inputs ``WSI_CANVAS_DICOM_SERIES``
(``largest``: the one WSI series with the largest total pixel matrix; ``all``: every WSI series),
``WSI_CANVAS_DICOM_SEG`` (``fractional``, ``binary``, ``both`` or ``off``; default ``fractional``) and
``WSI_CANVAS_DICOM_ANNOTATIONS`` (``1``/``0``, default ``1``). DICOM slides are read with OpenSlide whatever
``WSI_CANVAS_BACKEND`` says.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, ConditionType, Fragment, Operator, OperatorSpec

from monai_wsi_ext.deploy.inputs import input_slides
from monai_wsi_ext.deploy.models import load_exported_models, run_exported_inference

__all__ = ["CanvasHeatmapOperator", "SlideLoaderOperator", "WSICanvasApp", "settings_from_env"]

logger = logging.getLogger(__name__)


def settings_from_env(environ=os.environ) -> dict:
    """The non-path options of the application from ``WSI_CANVAS_*`` environment variables."""
    mpp = environ.get("WSI_CANVAS_MPP")
    return {
        "mode": environ.get("WSI_CANVAS_MODE") or None,
        "threshold": float(environ.get("WSI_CANVAS_THRESHOLD", 0.5)),
        "batch_size": int(environ["WSI_CANVAS_BATCH_SIZE"]) if environ.get("WSI_CANVAS_BATCH_SIZE") else None,
        "backend": environ.get("WSI_CANVAS_BACKEND", "auto"),
        "mpp": float(mpp) if mpp else None,
        "suffix": environ.get("WSI_CANVAS_MODEL_SUFFIX"),
        "device": environ.get("WSI_CANVAS_DEVICE", "auto"),
        "itk_format": environ.get("WSI_CANVAS_ITK_FORMAT") or None,
        "dicom_series": environ.get("WSI_CANVAS_DICOM_SERIES", "largest"),
        "dicom_seg": environ.get("WSI_CANVAS_DICOM_SEG", "fractional"),
        "dicom_annotations": environ.get("WSI_CANVAS_DICOM_ANNOTATIONS", "1").strip().lower() not in
        ("0", "false", "no", "off", ""),
    }


class SlideLoaderOperator(Operator):
    """Lists the slides of the input folder (slide files and selected DICOM WSI series, see
    :func:`monai_wsi_ext.deploy.inputs.input_slides`) or the input file, and emits them on ``slides``.

    Named output:
        slides: list of slide paths (files, DICOM series folders or level-0 instance files).
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, dicom_series: str = "largest", **kwargs):
        self.input_folder = Path(input_folder)
        self.dicom_series = dicom_series
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("slides")

    def compute(self, op_input, op_output, context):
        slides = input_slides(self.input_folder, self.dicom_series)
        logger.info("%d slide(s) in %s", len(slides), self.input_folder)
        op_output.emit(slides, "slides")


class CanvasHeatmapOperator(Operator):
    """Runs the exported encoder and canvas U-Net on the received slides and writes their heatmaps.

    Named input:
        slides: list of slide file paths.

    Named output:
        summary: the inference summary (per-slide scores and outputs, failures); optional downstream.
    """

    def __init__(self, fragment: Fragment, *args, model_path: Path, output_folder: Path, settings: dict,
                 **kwargs):
        from monai_wsi_ext.utils import resolve_device

        self.output_folder = Path(output_folder)
        self.settings = dict(settings)
        self.device = resolve_device(self.settings.get("device", "auto"))
        # loaded once, when the application is composed, not per compute call
        self.models = load_exported_models(model_path, self.device, self.settings.get("suffix"))
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("slides")
        spec.output("summary").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        slides = op_input.receive("slides")
        s = self.settings
        summary = run_exported_inference(
            slides, self.output_folder, self.models, mode=s.get("mode"), threshold=s.get("threshold", 0.5),
            batch_size=s.get("batch_size"), backend=s.get("backend", "auto"), mpp=s.get("mpp"),
            device=self.device, itk_format=s.get("itk_format"), dicom_seg=s.get("dicom_seg"),
            dicom_annotations=bool(s.get("dicom_annotations")),
        )
        op_output.emit(summary, "summary")


class WSICanvasApp(Application):
    """Whole-slide tumor heatmaps with the feature-canvas U-Net (Takahama et al., ICCV 2019)."""

    def compose(self):
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path, output_path = Path(app_context.input_path), Path(app_context.output_path)
        model_path = Path(app_context.model_path)
        logger.info("input %s, output %s, models %s", input_path, output_path, model_path)
        settings = settings_from_env()
        loader = SlideLoaderOperator(self, CountCondition(self, 1), input_folder=input_path,
                                     dicom_series=settings["dicom_series"], name="slide_loader")
        heatmaps = CanvasHeatmapOperator(self, model_path=model_path, output_folder=output_path,
                                         settings=settings, name="canvas_heatmaps")
        self.add_flow(loader, heatmaps, {("slides", "slides")})


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies into a DICOM output
    app = WSICanvasApp(argv) if argv is not None else WSICanvasApp()
    app.run()


if __name__ == "__main__":
    main()
