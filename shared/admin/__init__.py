"""The admin and query commands (never imported by the Function App)."""
