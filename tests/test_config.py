"""Every option of every config group composes, validates and instantiates."""

from __future__ import annotations

import pytest
import torch

from segkit.augment import JointAugment
from segkit.cli.common import group_options
from segkit.config import build, validate_config
from segkit.data.loading import build_dataset
from segkit.engine.optim import build_optimizer
from segkit.errors import ConfigError
from segkit.models import Segmenter

from .conftest import write_folder_dataset
from .test_data_formats import LAYOUTS


def options(group: str) -> list[str]:
    """What `group=...` accepts (conf/model/_base_.yaml and _smp_.yaml are shared defaults, no option)."""
    return group_options(group)


@pytest.mark.parametrize("option", options("model"))
def test_every_model_builds_and_runs(compose_cfg, option):
    from segkit.models import ARCHITECTURES

    needs_vit = ARCHITECTURES[option.rsplit("/", 1)[-1]].needs_vit  # dpt, linear: timm's tiny test ViT
    cfg = compose_cfg([f"model={option}", *(["backbone.name=test_vit2"] if needs_vit else [])])
    validate_config(cfg)
    model = build(cfg.model, "model")
    assert isinstance(model, Segmenter)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 36, 44))  # deliberately not a multiple of 32
    assert out.shape == (1, cfg.dataset.num_classes, 36, 44)


@pytest.mark.parametrize("option", options("backbone"))
def test_every_backbone_builds(compose_cfg, option):
    cfg = compose_cfg([f"backbone={option}", "model=fpn"])
    model = build(cfg.model, "model")
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)


@pytest.mark.parametrize("option", options("loss"))
def test_every_loss_builds_and_ignores_void(compose_cfg, option):
    cfg = compose_cfg([f"loss={option}"])
    loss_fn = build(cfg.loss, "loss")
    binary = option == "dice_bce"  # one logit per pixel, 0/1 targets (model.num_classes=1)
    logits = torch.randn(2, 1 if binary else 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 2 if binary else 4, (2, 8, 8))
    target[:, :2] = 255
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    # Ignored pixels receive no gradient.
    assert logits.grad is not None
    assert logits.grad[:, :, :2].abs().max() == 0
    assert logits.grad[:, :, 2:].abs().max() > 0


@pytest.mark.parametrize("option", options("optimizer"))
def test_every_optimizer_builds(compose_cfg, option):
    cfg = compose_cfg([f"optimizer={option}", "optimizer.head_lr_mult=10"])
    model = build(cfg.model, "model")
    optimizer = build_optimizer(cfg.optimizer, model)
    encoder_lr, head_lr = (g["lr"] for g in optimizer.param_groups)
    assert head_lr == pytest.approx(10 * encoder_lr)


@pytest.mark.parametrize("option", options("scheduler"))
def test_every_scheduler_builds_and_steps(compose_cfg, option):
    extra = ["scheduler.step_size=20"] if option == "step" else []
    cfg = compose_cfg([f"scheduler={option}", "scheduler.warmup_steps=5", *extra])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build(cfg.scheduler, "scheduler")(optimizer, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[5]  # warmup rises
    assert max(lrs) == pytest.approx(0.1, rel=1e-3)
    assert lrs[-1] < lrs[10]  # then decays


@pytest.mark.parametrize("option", options("augmentation"))
def test_every_augmentation_builds(compose_cfg, option):
    cfg = compose_cfg([f"augmentation={option}"])
    augment = build(cfg.augmentation, "augmentation")
    assert isinstance(augment, JointAugment)
    images, masks = augment(torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32)))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    assert masks.dtype == torch.int64


@pytest.mark.parametrize("option", options("dataset"))
def test_every_dataset_builds(compose_cfg, option, tmp_path):
    layouts = {  # image dir, mask dir, mask values, the split folders' names
        "folder": ("images/{split}", "masks/{split}", [0, 1, 2], ("train", "val")),
        "camvid": ("{split}", "{split}annot", [0, 5, 11], ("train", "val")),
        "membrane": ("{split}/image", "{split}/label", [0, 255, 0], ("train", "val")),
        "ade20k": ("images/{split}", "annotations/{split}", [0, 1, 2], ("training", "validation")),
        "coco_stuff164k": ("images/{split}2017", "annotations/{split}2017", [0, 1, 255], ("train", "val")),
    }
    overrides = [f"dataset={option}"]
    if option in layouts:
        image_dir, mask_dir, values, splits = layouts[option]
        write_folder_dataset(tmp_path, splits=splits, image_dir=image_dir, mask_dir=mask_dir, mask_values=values)
        overrides += [f"dataset.root={tmp_path}", "dataset.image_size=[32,32]"]
        if option == "folder":
            overrides.append("dataset.num_classes=3")
    elif option in LAYOUTS:  # voc, cityscapes, coco
        writer, extra = LAYOUTS[option]
        overrides = [f"dataset={option}", *extra(writer(tmp_path / option)), "dataset.image_size=[32,32]"]
    cfg = compose_cfg(overrides, tiny=option == "synthetic")
    validate_config(cfg)
    dataset = build_dataset(cfg.dataset, "train")
    image, mask = dataset[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
    valid = mask[mask != cfg.dataset.ignore_index]
    assert valid.numel() and int(valid.max()) < cfg.dataset.num_classes


@pytest.mark.parametrize("option", options("logger"))
def test_every_logger_builds(compose_cfg, option):
    cfg = compose_cfg([f"logger={option}"])
    for name, node in (cfg.logger or {}).items():
        assert build(node, f"logger.{name}") is not None


def test_experiment_camvid_deeplabv3plus_recipe(compose_cfg):
    cfg = compose_cfg(["experiment=camvid_deeplabv3plus", "dataset.root=/data/camvid"], tiny=False)
    validate_config(cfg)
    assert cfg.model.arch == "deeplabv3plus" and cfg.dataset.name == "camvid"
    assert cfg.task_name == "camvid_deeplabv3plus"  # the preset's name wins over train.yaml's default
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.01, 0.9, 1e-4)
    assert cfg.scheduler._target_ == "segkit.engine.optim.poly" and cfg.scheduler.power == 0.9
    assert (cfg.trainer.batch_size, cfg.trainer.max_epochs, cfg.trainer.early_stopping_patience) == (8, 60, 15)
    assert cfg.loss._target_ == "segkit.losses.WeightedSum"
    assert cfg.backbone.pretrained is True and cfg.backbone.freeze is False
    assert cfg.dataset.ignore_index == 255 and cfg.dataset.remap == {11: 255}
    # Offline and without a weights file, pretrained=true is a one-line config error.
    with pytest.raises(ConfigError, match="backbone.pretrained"):
        build(cfg.model, "model")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("dataset.ignore_index=2", "dataset.ignore_index"),
        ("model.num_classes=7", "model.num_classes"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("augmentation.crop_size=[64,64]", "augmentation.crop_size"),
        ("augmentation.class_uniform=1.5", "augmentation.class_uniform"),
        ("augmentation.crop_size=null augmentation.class_uniform=0.5", "augmentation.class_uniform"),
        ("trainer.threads=0", "trainer.threads"),
    ],
)
def test_invalid_values_name_the_key(compose_cfg, override, key):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value).startswith(key)


def test_backbone_that_cannot_dilate_names_output_stride(compose_cfg):
    cfg = compose_cfg(["model=deeplabv3plus", "backbone.name=pvt_v2_b0", "backbone.output_stride=8"])
    with pytest.raises(ConfigError, match=r"^backbone.output_stride"):
        build(cfg.model, "model")
