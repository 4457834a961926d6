"""The operator console: the HTTP admin API under /console/api/ and the page at /console that uses it."""
