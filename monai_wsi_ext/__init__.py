"""monai_wsi_ext."""
