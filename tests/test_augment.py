"""Joint augmentation keeps masks exact: invented pixels are ignore, flips stay aligned, bf16-safe."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
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


def blob_batch(count: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Background class 1 everywhere, a 3x3 blob of class 2 at a random place, and an ignored stripe; the
    image's red channel encodes each pixel's class (ignore as 0.9)."""
    generator = torch.Generator().manual_seed(7)
    masks = torch.ones(count, size, size, dtype=torch.long)
    masks[:, :, :4] = IGNORE
    for index, (row, col) in enumerate(torch.randint(8, size - 8, (count, 2), generator=generator).tolist()):
        masks[index, row:row + 3, col:col + 3] = 2
    red = torch.where(masks == IGNORE, 0.9, masks / 10)
    return torch.stack([red, torch.zeros_like(red), torch.ones_like(red) * 0.5], 1), masks


def test_class_uniform_crops_frame_the_rare_class():
    images, masks = blob_batch(400)
    torch.manual_seed(0)
    centred = JointAugment([], IGNORE, crop_size=[16, 16], class_uniform=1.0, num_classes=3)(images, masks)[1]
    torch.manual_seed(0)
    uniform = JointAugment([], IGNORE, crop_size=[16, 16])(images, masks)[1]
    with_blob = [(crops == 2).flatten(1).any(1).float().mean().item() for crops in (centred, uniform)]
    # Centred: the class is drawn from {1, 2} with probability 1/2 each, and a crop centred on the blob holds
    # it; a crop centred on the background may hold it too: expected >= 0.5, 400 draws put 0.4 at 4 standard
    # deviations. Uniform: a 16x16 window meets the 3x3 blob at (16+2)^2 of 49^2 offsets, about 0.135
    # (sd 0.017 over 400): 0.25 is 6 standard deviations away.
    assert with_blob[0] > 0.4 and with_blob[1] < 0.25


def test_class_uniform_crops_are_exact_windows_of_image_and_mask():
    images, masks = blob_batch(16)
    torch.manual_seed(3)
    out_images, out_masks = JointAugment([], IGNORE, crop_size=[16, 24], class_uniform=0.5, num_classes=3)(
        images, masks)
    assert out_images.shape == (16, 3, 16, 24) and out_masks.shape == (16, 16, 24)
    decoded = torch.where(out_masks == IGNORE, 0.9, out_masks / 10)
    assert torch.equal(out_images[:, 0], decoded)  # no resampling: the image moves with its mask
    for image, whole in zip(out_images, images, strict=True):  # a window of the input
        windows = whole[0].unfold(0, 16, 1).unfold(1, 24, 1)
        assert (windows == image[0]).flatten(2).all(2).any()


def test_class_uniform_pads_small_samples_with_ignore_and_repeats_under_a_seed():
    images, masks = blob_batch(4, size=20)
    augment = JointAugment([], IGNORE, crop_size=[24, 28], class_uniform=1.0, num_classes=3)
    torch.manual_seed(5)
    first = augment(images, masks)
    torch.manual_seed(5)
    again = augment(images, masks)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert (first[1][:, 20:, :] == IGNORE).all() and (first[1][:, :, 20:] == IGNORE).all()
    assert set(first[1].unique().tolist()) <= {1, 2, IGNORE}  # the padding is never a class


def test_class_uniform_never_centres_on_ignore():
    masks = torch.full((64, 32, 32), IGNORE, dtype=torch.long)
    masks[:, 28:, 28:] = 0  # one class, in a corner; the rest ignored
    images = torch.rand(64, 3, 32, 32)
    torch.manual_seed(0)
    _, out = JointAugment([], IGNORE, crop_size=[8, 8], class_uniform=1.0, num_classes=2)(images, masks)
    # Every crop holds a pixel of the class (its centre); a uniform 8x8 crop would meet the 4x4 corner at
    # (8+3)^2 of 25^2 offsets, about 0.19, so all 64 by chance is out of the question.
    assert (out == 0).flatten(1).any(1).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_class_uniform_crops_read_nothing_back_to_the_host():
    images, masks = blob_batch(8)
    augment = JointAugment([], IGNORE, crop_size=[16, 16], class_uniform=0.5, num_classes=3)
    images, masks = images.cuda(), masks.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(images, masks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
