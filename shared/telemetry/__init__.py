"""Token metrics, traces and usage rows."""
