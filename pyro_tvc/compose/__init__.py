"""Per-sample task-vector composition."""
