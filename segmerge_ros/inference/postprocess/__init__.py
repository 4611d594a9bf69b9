"""From network outputs to published maps: the upsampled arg-max and Mask2Former's instances/panoptic."""
