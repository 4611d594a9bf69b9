"""The ROS 2 node and only what the node runs (the one layer, with apps/ and bench/, that imports rclpy)."""

# Before any module here imports torch: OpenMP reads its wait policy once, when it loads (inference/threads.py).
from segmerge_ros.inference.threads import prepare_thread_pools

prepare_thread_pools()
