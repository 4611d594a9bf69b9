"""The node builds, warms and runs its models on its one worker thread (two live threads with torch OpenMP pools
slow each other down: docs/benchmarks.md section 11c). In-process, over real rclpy."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.parameter import Parameter

from conftest import ros_domain_id
from segmerge_ros.ros import node as node_module
from segmerge_ros.ros.startup import StartupError
from segmerge_ros.inference.engine import SegmentationEngine


@pytest.fixture
def context():
    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id("node_threads"))
    yield context
    rclpy.try_shutdown(context=context)


def make_node(context, **values):
    overrides = [Parameter(name, value=value) for name, value in
                 {"image_topics": ["/threads_cam/image"], "input_size": "64x96", "weights": "random",
                                  "backend": "eager", "precision": "fp32", **values}.items()]
    return node_module.SegmergeNode(context=context, parameter_overrides=overrides)


def test_models_are_built_warmed_and_run_on_the_worker_thread(context, monkeypatch):
    threads = []
    real_infer = SegmentationEngine.infer

    def recording_infer(engine, rgb, **options):
        threads.append(threading.current_thread())
        return real_infer(engine, rgb, **options)

    monkeypatch.setattr(SegmentationEngine, "infer", recording_infer)
    node = make_node(context)
    try:
        assert threads, "the start-up warm-up ran no inference"
        assert set(threads) == {node._worker}  # the warm-up: on the worker, not on the constructing thread
        assert threading.current_thread() is not node._worker
        node.pipeline.engine.infer(np.zeros((64, 96, 3), np.uint8))  # (a call from here is recorded as such)
        assert threads[-1] is threading.current_thread()
    finally:
        node.stop()
        node.destroy_node()


def test_a_model_that_cannot_be_built_on_the_worker_fails_the_constructor(context, tmp_path):
    with pytest.raises(StartupError, match="cannot load weights"):
        make_node(context, weights=str(tmp_path / "missing.safetensors"))
