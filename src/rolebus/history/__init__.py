"""Looking back: replay, the task projection, rerun (what-if), status and metrics."""
