"""Joint augmentation keeps masks exact: invented pixels are ignore, flips stay aligned, bf16-safe."""

from __future__ import annotations

import kornia.augmentation as K
import torch

from segkit.augment import JointAugment

IGNORE = 255


def striped_batch(classes=(1, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks without class 0; the image encodes the class in its red channel."""
    mask = torch.tensor(classes).repeat_interleave(12)[None, :, None].expand(4, 36, 40).clone()
    image = torch.stack([mask / 10, torch.zeros_like(mask, dtype=torch.float), torch.ones_like(mask) * 0.5], 1)
    return image.float(), mask.long()


def test_rotation_and_zoom_out_pad_with_ignore_not_class_zero():
    torch.manual_seed(0)
    augment = JointAugment([K.RandomAffine(degrees=45, scale=(0.5, 0.6), p=1.0)], IGNORE, crop_size=[48, 48])
    images, masks = striped_batch()
    _, out = augment(images, masks)
    assert out.shape == (4, 48, 48)
    assert (out == IGNORE).any()  # corners and the zoomed-out border were invented ...
    assert not (out == 0).any()  # ... and none of them became class 0
    assert set(out.unique().tolist()) <= {1, 2, 3, IGNORE}  # nearest resampling: no blended labels


def test_ignore_pixels_stay_ignore_through_geometry():
    augment = JointAugment([K.RandomHorizontalFlip(p=1.0)], IGNORE)
    images, masks = striped_batch()
    masks[:, :5] = IGNORE
    _, out = augment(images, masks)
    assert torch.equal(out, masks.flip(-1))


def test_flip_keeps_image_and_mask_aligned():
    torch.manual_seed(1)
    augment = JointAugment([K.RandomHorizontalFlip(p=0.5), K.RandomAffine(degrees=20, p=1.0)], IGNORE)
    images, masks = striped_batch()
    out_images, out_masks = augment(images, masks)
    valid = out_masks != IGNORE
    # Away from label borders the red channel still encodes each pixel's class.
    interior = valid & (out_masks == torch.nn.functional.max_pool2d(
        out_masks.float()[:, None], 3, 1, 1)[:, 0].long())
    decoded = (out_images[:, 0] * 10).round().long()
    agreement = (decoded[interior] == out_masks[interior]).float().mean()
    assert agreement > 0.97


def test_labels_survive_bf16_autocast():
    classes = (1, 7, 200, 253)  # large ids lose precision in bf16 (8-bit mantissa)
    augment = JointAugment([K.RandomAffine(degrees=30, p=1.0)], IGNORE, crop_size=[32, 32])
    masks = torch.tensor(classes).repeat_interleave(10)[None, :, None].expand(4, 40, 40).long()
    images = torch.rand(4, 3, 40, 40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_images, out = augment(images, masks)
    assert out.dtype == torch.int64 and out_images.dtype == torch.float32
    assert set(out.unique().tolist()) <= {*classes, IGNORE}
