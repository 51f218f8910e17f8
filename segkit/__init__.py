"""segkit: Hydra-composed semantic segmentation experiments on plain PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the package's version: pyproject.toml reads it from here
__all__ = ["Predictor", "load"]

if TYPE_CHECKING:
    from segkit.inference.predictor import Predictor, load


def __getattr__(name: str) -> Any:
    """`segkit.load` / `segkit.Predictor` import torch and the models only when first used."""
    if name in __all__:
        from segkit.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'segkit' has no attribute {name!r}")
