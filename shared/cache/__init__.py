"""The exact-match response cache: its key, its rules, its entries and its layers (docs/cache.md)."""
