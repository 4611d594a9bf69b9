"""Applications around the node: segmerge-bag, the demos with their camera and client, segmerge-build-engines."""

# Before any module here imports torch: OpenMP reads its wait policy once, when it loads (inference/process.py).
from segmerge_ros.inference.process import prepare_process

prepare_process()
