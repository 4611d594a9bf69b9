"""segmerge-bench and every benchmark tool: one command line, the same flags for every model family."""

# Before any module here imports torch: OpenMP reads its wait policy once, when it loads (inference/process.py).
from segmerge_ros.inference.process import prepare_process

prepare_process()
