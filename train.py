"""Train a segmentation model: `python train.py model=deeplabv3plus loss=ce_dice` (Hydra overrides)."""

from segkit.cli.train import main

if __name__ == "__main__":
    main()
