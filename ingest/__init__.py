"""Bulk registration of objects already in cloud storage as V7 Darwin dataset items."""

__version__ = "0.1.0"
USER_AGENT = f"v7-ingest/{__version__}"
