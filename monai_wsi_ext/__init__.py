"""monai_wsi_ext: the extension package of the monai-wsi-canvas bundle.

Sub-packages follow the pipeline's stages: ``io`` (slide reading, annotations, atomic writes), ``prep`` (tissue,
patch grid, prepared slides), ``data`` (transforms, patch and canvas datasets), ``model`` (networks, the canvas, the
single prediction path), ``engines`` (end-to-end training, slide evaluators), ``inference`` (feature extraction,
slide inference), ``outputs`` (maps, TIFF, GeoJSON, run records), ``evaluation`` (metrics, reports), ``baselines``,
``export`` and ``deploy``. ``testing`` (the synthetic slide generator, benchmark helpers) serves the demo, tests
and benchmarks and is not imported by the runtime.

Modules are imported on demand (``import monai_wsi_ext.model.canvas``) so that this package imports without torch-heavy
work; bundle configs name classes by dotted path.
"""

__version__ = "0.1.0"
