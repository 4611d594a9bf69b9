"""Backbones that Mask2Former takes besides MiT: Swin and ResNet."""
