"""In-memory stand-ins for the gateway's I/O: a scripted upstream, a recording telemetry sink, and the harness that
builds the real gateway around them."""
