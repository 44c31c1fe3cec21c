"""Retrieval heads: detection, probes, comparison between models, knockout."""
