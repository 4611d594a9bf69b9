"""Applications around the node: segmerge-bag, the demos with their camera and client, segmerge-build-engines."""
