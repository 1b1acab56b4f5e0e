"""Per-model-family search spaces (installed as ``autoprune.search_spaces``)."""
