"""Inference: the predictor behind segkit.load, sliding windows and TTA, evaluation, export."""
