"""segmerge-bench and every benchmark tool: one command line, the same flags for every model family."""

# Before any module here imports torch: OpenMP reads its wait policy once, when it loads (inference/threads.py).
from segmerge_ros.inference.threads import prepare_thread_pools

prepare_thread_pools()
