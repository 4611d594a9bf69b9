"""Segformer++ pose: the SegFormer encoder with a keypoint-heatmap head."""
