"""Data: files -> reader (readers/) -> training geometry (geometry.py) -> batches on the device (loading.py)."""
