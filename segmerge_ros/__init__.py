"""segmerge_ros: transformer segmentation with token merging for ROS 2.

Layers, every import pointing down (docs/architecture.md; test/test_layers.py enforces it):
merging -> models -> inference -> ros -> apps -> bench, with training beside apps (inference and below).
Only ``ros``, ``apps`` and ``bench`` import rclpy.
"""

__version__ = "0.1.0"
