"""Token operations and the merge ladders: bipartite matching, token groups, Segformer++ configurations (torch only)."""
