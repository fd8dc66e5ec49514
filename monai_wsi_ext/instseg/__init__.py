"""Instance segmentation: Mask R-CNN on the tile segmentation's tiles (:mod:`~monai_wsi_ext.instseg.maskrcnn`;
``train_maskrcnn.json``, ``infer_maskrcnn.json``; documentation ``bundle/docs/tile_segmentation.md``)."""

__all__ = ["maskrcnn"]
