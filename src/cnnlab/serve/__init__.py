"""Serving: an HTTP API and a web page for predictions (needs the `serve` extra)."""
