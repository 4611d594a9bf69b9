"""segmerge-train and its subcommands, teachers (MoveNet) and pose metrics (no ROS)."""
