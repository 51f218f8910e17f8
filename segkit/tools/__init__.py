"""Dataset tools: checks, layout detection, splits."""
