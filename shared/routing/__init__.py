"""Backend choice: priority, weight and circuit breakers."""
