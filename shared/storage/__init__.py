"""Table Storage stores and their errors."""
