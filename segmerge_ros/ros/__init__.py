"""The ROS 2 node and only what the node runs (the one layer, with apps/ and bench/, that imports rclpy)."""

# Before any module here imports torch: OpenMP reads its wait policy once, when it loads (inference/process.py).
from segmerge_ros.inference.process import prepare_process

prepare_process()
