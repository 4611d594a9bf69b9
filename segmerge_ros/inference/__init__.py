"""Frames in, maps out: the engine, backends, post-processing, budget controller and pose estimator (no ROS)."""
