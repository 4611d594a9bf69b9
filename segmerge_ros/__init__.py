"""segmerge_ros: transformer segmentation with token merging for ROS 2.

Layers (each imports only those before it): merging primitives -> models -> merging methods -> runtime ->
ros / tools (docs/architecture.md; test/test_layers.py enforces it).
Only ``segmerge_ros.ros`` imports rclpy.
"""

__version__ = "0.1.0"
