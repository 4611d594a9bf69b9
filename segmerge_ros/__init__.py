"""segmerge_ros: transformer segmentation with token merging for ROS 2.

Layers (each imports only those before it): models -> merging -> runtime -> ros / tools.
Only ``segmerge_ros.ros`` imports rclpy.
"""

__version__ = "0.1.0"
