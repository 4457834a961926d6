"""The stores: their contract and errors (protocols.py), Table Storage (tables.py), in-memory twins (memory.py)."""
