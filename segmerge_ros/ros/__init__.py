"""The ROS 2 node and only what the node runs (the one layer, with apps/ and bench/, that imports rclpy)."""
