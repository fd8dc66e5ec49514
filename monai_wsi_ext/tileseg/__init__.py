"""Pixel-level tile segmentation: the review articles' U-Net workflow next to the paper's patch-grid canvas method.

Every slide is seen at one target resolution in µm/px, whatever its size and scanner mpp (resampled with one factor
for both axes: aspect kept, never stretched). The stages, one module each:

* :mod:`~monai_wsi_ext.tileseg.masks`: the target-resolution geometry of a slide, label masks rasterised from the
  annotations (every format :mod:`monai_wsi_ext.io.annotations` reads, and label-mask images) for any window at
  any resolution, tissue sampled onto the same pixels, and per-tile tissue/tumor fractions.
* :mod:`~monai_wsi_ext.tileseg.tiles`: tiles read through the project's slide reader at the target resolution
  (padded at the slide border), the training dataset of tissue tiles with their masks (flips/rot90 and the
  project's colour augmentation, class-balanced sampling), the Dice + cross-entropy loss with ignored pixels and
  the pooled pixel metrics of the validation.
* :mod:`~monai_wsi_ext.tileseg.infer`: overlapping sliding windows over the slide with MONAI's ``PatchInferer``, a
  splitter that reads tiles through the project's reader and a merger that blends them (gaussian or constant
  weights) into a whole-slide probability mask at the target resolution.
* :mod:`~monai_wsi_ext.tileseg.postprocess`: tissue masking, threshold, small-object removal and hole filling.
* :mod:`~monai_wsi_ext.tileseg.outputs`: the canvas method's outputs (aligned pyramidal TIFF, overlay PNG, QuPath
  GeoJSON with holes, record) from the pixel mask, the per-patch-grid probabilities that ``evaluate.json`` scores,
  and the pixel-level Dice against a truth mask.

Bundle configs: ``bundle/configs/train_tile_seg.json`` and ``bundle/configs/infer_tile_seg.json``; documentation:
``bundle/docs/tile_segmentation.md``.
"""

__all__ = ["masks", "tiles", "infer", "postprocess", "outputs"]
