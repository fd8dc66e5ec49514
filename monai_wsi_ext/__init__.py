"""monai_wsi_ext: the extension package of the monai-wsi-canvas bundle.

Whole-slide reading with backend fallback (``wsi``), tissue detection (``tissue``), the labelled patch grid (``grid``,
``annotations``, ``prepare``), synthetic slides (``synthetic``), patch data (``data``), encoders and the canvas U-Net
(``networks``, ``canvas``), separate and surrogate-loss end-to-end training (``engines``, ``workflows``), heatmap
writers (``writers``), metrics and evaluation (``metrics``, ``evaluation``, ``baselines``).

Modules are imported on demand (``import monai_wsi_ext.model.canvas``) so that this package imports without torch-heavy
work; bundle configs name classes by dotted path.
"""

__version__ = "0.1.0"
