"""Slide-level classification: the review articles' two slide-level workflows next to the canvas method.

* :mod:`~monai_wsi_ext.slidecls.thumbnails`: the whole slide at a fixed µm/px, padded to a square (never
  stretched), and the slide's class (tumor / no tumor, Camelyon17 classes).
* :mod:`~monai_wsi_ext.slidecls.cnn`: a CNN on that thumbnail (``train_slide_cnn.json``, ``infer_slide_cnn.json``).
* :mod:`~monai_wsi_ext.slidecls.aggregate`: any heatmap -> a slide call from its max, top-k mean, tumor-area fraction
  and largest region, learned on validation slides (``aggregate_heatmaps.json``).
* :mod:`~monai_wsi_ext.slidecls.scores`: the slide-scores file every slide-level method writes and
  ``evaluate.json`` reads (``slide_predictions``), and the slide metrics.

Documentation: ``bundle/docs/slide_level.md``.
"""

__all__ = ["thumbnails", "cnn", "aggregate", "scores"]
