"""segkit: Hydra-composed semantic segmentation experiments on plain PyTorch."""

__version__ = "0.1.0"
