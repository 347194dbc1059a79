"""vlmrun-artifact-cache: a local caching reverse proxy for the VLM Run API."""

__version__ = "0.1.0"
