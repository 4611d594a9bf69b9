"""segmerge-bench and every benchmark tool: one command line, the same flags for every model family."""
