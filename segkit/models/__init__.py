"""Models: the architecture table and `build_model` (build.py), attention blocks, and the model's own
inference (sliding.py: whole image, sliding windows, test-time augmentation).

`segkit.models.build_model` is the `_target_` every model config and every stored checkpoint names."""

from segkit.models.build import ARCHITECTURES, Architecture, Segmenter, build_model

__all__ = ["ARCHITECTURES", "Architecture", "Segmenter", "build_model"]
