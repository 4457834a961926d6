"""Records and values at the bottom of the package: what the stores hold and what settings name. They import
nothing of the package above them (docs/architecture.md, tests/test_layout.py)."""
