"""Networks and their checkpoint formats (imports only merging/)."""
