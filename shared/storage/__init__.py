"""The stores: their contract and errors (protocols.py), Table Storage (tables.py: the account and the one
ETag read-modify-write; one *_table.py module per table), in-memory twins (memory.py)."""
