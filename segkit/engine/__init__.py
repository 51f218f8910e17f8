"""The training engine: loop, validation, checkpoints."""
