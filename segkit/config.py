"""Structured-config schemas and the checks Hydra's types cannot express.

Each reader owns its dataset schema (segkit/data/readers/); the entry points register them all
in Hydra's ConfigStore (segkit.cli.common.register_configs), and `conf/train.yaml` and the dataset
files list them in their defaults, so a misspelt key or a wrong type fails at composition with the
key named. `validate_config` then checks values that depend on each other, before any data
is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from segkit import registry
from segkit.errors import ConfigError, SegkitError

INFERENCE_MODES = ("auto", "whole", "slide")  # trainer.inference_mode (segkit/data/geometry.py)

# trainer.precision -> the autocast dtype (a torch attribute name; None: no autocast). The one table:
# segkit.engine.step.autocast reads it for training, validation and the Predictor.
PRECISIONS: dict[str, str | None] = {"32": None, "16-mixed": "float16", "bf16-mixed": "bfloat16"}

# conf/hydra/launcher/submitit_{slurm,local}.yaml shadow the submitit plugin's nodes on purpose (see
# _register_launcher_schemas). Hydra 1.3 still also merges a file onto the ConfigStore node of the same
# name and warns that this is deprecated. Set at import: submitit's task processes compose the config
# again and import this module, but never call register_configs().
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema"
)


@dataclass
class MetricConfig:
    """One entry of the `metrics:` config: a torchmetrics (or segkit.metrics) class and where it runs."""

    metric: str = "???"  # class path, e.g. torchmetrics.classification.MulticlassF1Score
    params: dict[str, Any] = field(default_factory=dict)
    stages: list[str] = field(default_factory=lambda: ["val", "test"])
    prog_bar: bool = False  # also shown in the training progress bar
    input: str = "labels"  # labels: (B, H, W) class ids; probs: (B, C, H, W) softmax probabilities


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int | None = None  # when set, training stops after this many optimizer steps
    batch_size: int = 8
    val_batch_size: int | None = None  # defaults to batch_size
    num_workers: int = 2
    # torch's CPU threads in this training process; null = the host's cores divided among the trainings live on
    # it (counted again at every logging step; at least the job's ranks on this host), one core left to the
    # loader workers when a share is large (segkit/engine/threads.py); OMP_NUM_THREADS, when set, is followed
    threads: int | None = None
    accelerator: str = "auto"  # auto | cpu | cuda
    precision: str = "32"  # 32 | 16-mixed | bf16-mixed
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    val_every_n_epochs: int = 1
    # native: each validation image scored at its own size against its untouched mask (MMSeg's IoUMetric
    # protocol, every published figure) | input: at the letterboxed size, with the letterboxed mask (faster)
    score_at: str = "native"
    # How validation and every inference path (evaluate, predict, segkit.load, ONNX) run a model trained on
    # crops smaller than dataset.image_size: auto = sliding windows of the crop | whole = the whole letterboxed
    # image at once | slide. Recorded in the checkpoint's geometry; their mode=auto follows it.
    inference_mode: str = "auto"
    log_every_n_steps: int = 10
    # any logged value (val/miou, val/loss, val/<metrics name>, train/loss, ...): selects the best checkpoint
    # and drives early stopping
    monitor: str = "val/miou"
    monitor_mode: str = "auto"  # max | min | auto (min for names ending in "loss", else max)
    save_top_k: int = 0  # also keep the k best checkpoints, epoch=E-<monitor>=S.pt, besides best.pt / last.pt
    ema_decay: float | None = None  # e.g. 0.999: validate, select and save an EMA of the weights (timm ModelEmaV3)
    log_images_every_n_val: int = 0  # every N validations: overlays of a fixed validation sample to the trackers
    log_images_count: int = 4  # the first N validation images
    early_stopping_patience: int | None = None  # in validations without improvement
    resume: str | None = None  # auto | path to a checkpoint
    stop_after_steps: int | None = None  # stop early as if interrupted (time-boxed jobs); resume continues
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    seed: int = 42
    deterministic: bool = False
    compile: bool = False
    channels_last: bool | None = None  # null = on for CUDA (tensor cores), off on CPU (slower there)
    activation_checkpointing: bool = False  # recompute encoder activations in backward: less memory for large crops
    save_checkpoints: bool = True
    progress_bar: bool = True
    # Several processes (torchrun / submitit tasks): batch_size is per process; see README "Scaling out".
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (CUDA only)
    dist_timeout_s: int = 600  # a collective waiting longer (a peer died or hangs) fails the process


@dataclass
class BackboneConfig:
    name: str = "resnet18"  # any timm model name that supports features_only, or any timm plain ViT
    pretrained: bool = False
    weights: str | None = None  # local weights (file, or a timm / Hugging Face folder) used when pretrained=true
    output_stride: int | None = None  # 8 or 16 for dilated encoders; null = architecture default
    freeze: bool = False
    drop_path_rate: float = 0.0  # stochastic depth in the encoder's blocks (ViTs, ConvNeXt, ...)
    block_indices: list[int] | None = None  # plain ViTs: the 4 blocks feeding strides 4-32; null = the last block


@dataclass
class DatasetConfig:
    """Fields every dataset has; readers add their own in their schema."""

    _target_: str = "???"
    name: str = "???"
    num_classes: int = "???"  # type: ignore[assignment]
    class_names: list[str] | None = None
    ignore_index: int = 255
    image_size: list[int] = field(default_factory=lambda: [256, 256])  # every sample is letterboxed to H, W
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


PRIVACY_ACCOUNTANTS = ("rdp", "prv", "gdp")


@dataclass
class PrivacyConfig:
    """conf/privacy/dp.yaml (segkit/engine/privacy.py): the seed guide's DP trainer keys plus the accountant."""

    noise_multiplier: float | None = None  # sigma; null = solved from target_epsilon for the planned steps
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound C
    target_epsilon: float | None = None  # budget: solve sigma for it, or stop before exceeding it
    target_delta: float = 1.0e-5  # should be well below 1 / (training samples)
    accountant: str = "rdp"  # rdp | prv | gdp (Opacus accountants)
    secure_mode: bool = False  # Opacus' cryptographically safe noise (slower; not reproducible by seed)


@dataclass
class FederatedConfig:
    """conf/federated/*.yaml (segkit/federated.py): a Flower federation of segkit clients."""

    strategy: str = "FedAvg"  # a Flower strategy class: FedAvg, FedProx, FedAdam, FedYogi, FedMedian, ...
    strategy_options: dict[str, Any] = field(default_factory=dict)  # extra arguments of that class
    num_clients: int = 3
    min_fit_clients: int | None = None  # clients a round needs (the rest may fail); null = all
    rounds: int = 3
    local_epochs: int = 1  # epochs of the ordinary training loop on each client per round
    proximal_mu: float = 0.01  # FedProx's mu (its strategy sends it to the clients)
    partition: str = "iid"  # iid | dirichlet (skewed by each image's rarest present class)
    dirichlet_alpha: float = 0.5  # smaller = more skewed
    mode: str = "simulation"  # simulation (all on this machine) | server | client
    server_address: str = "127.0.0.1:8080"  # server: where to listen; client: where to connect
    client_id: int = 0  # mode=client: which shard this site trains
    round_timeout_s: float = 600.0  # a client silent this long counts as failed for the round


@dataclass
class TrainConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: Any = None
    model: Any = None
    loss: Any = None
    optimizer: Any = None
    scheduler: Any = None
    augmentation: Any = None
    logger: Any = None
    metrics: dict[str, MetricConfig] = field(default_factory=dict)  # conf/metrics/: extra torchmetrics metrics
    privacy: Any = None  # privacy=dp: DP-SGD with Opacus (segkit/engine/privacy.py)
    federated: Any = None  # federated=fedavg: a Flower federation (segkit/federated.py)
    task_name: str = "train"
    output_root: str = "outputs"


@dataclass
class CheckDataConfig:
    """Entry config of `segkit-check-data` (conf/check_data.yaml)."""

    dataset: Any = None
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    write_weights: str | None = None  # path: median-frequency class weights (train split) as YAML
    preview: str | None = None  # path: PNG grid of train images with class overlays and a legend
    preview_count: int = 8
    preview_size: int = 256  # longest side of each preview tile
    page: str | None = None  # folder: a static HTML page browsing every readable sample (index.html)
    page_thumb_size: int = 192  # longest side of a page thumbnail
    page_image_size: int = 1024  # longest side of the page's detail image (downscaled, never upscaled)
    page_workers: int = 0  # processes drawing the page's images; 0: one per usable core, at most 32
    progress_bar: bool = True


# The entry configs of the inference commands: keys and types only, so that a misspelt key or a wrong type
# fails at start with the key named. Each default, and what the key does, is written once, in the
# command's conf/<name>.yaml (a key the YAML leaves out would compose as ??? and fail where it is read).
@dataclass
class InferenceOptions:
    """What segkit-evaluate and segkit-predict share: the device, trust, and the inference geometry."""

    device: str
    trust_checkpoint: bool
    test_size: list[int] | None
    mode: str
    crop_size: list[int] | None
    stride: list[int] | None
    tta: bool
    tta_scales: list[float]
    tta_flip: bool
    min_region: int
    max_hole: int
    uncertainty_method: str
    mc_samples: int


@dataclass
class EvaluateConfig(InferenceOptions):
    """`segkit-evaluate` (conf/evaluate.yaml)."""

    checkpoint: str
    split: str
    output_dir: str | None
    dataset: dict[str, Any]  # stored dataset keys to change; +dataset.<key>=value adds any other
    batch_size: int | None
    num_workers: int
    score_at: str
    save_masks: bool
    report: bool
    calibration_bins: int
    uncertainty_maps: bool
    worst_n: int
    worst_per_class: int
    progress_bar: bool


@dataclass
class PredictConfig(InferenceOptions):
    """`segkit-predict` (conf/predict.yaml)."""

    checkpoint: Any  # a path, or a list of paths (an ensemble)
    input: str
    output: str
    batch_size: int
    num_workers: int
    overlay: bool
    probabilities: bool
    uncertainty: bool
    max_pixels: int
    progress_bar: bool


@dataclass
class ExportConfig:
    """`segkit-export` (conf/export.yaml)."""

    checkpoint: str
    format: str
    trust_checkpoint: bool
    output: str | None
    opset: int
    dynamic: bool
    height: int | None
    width: int | None
    validate: bool
    atol: float
    benchmark: bool
    benchmark_batch: int
    benchmark_runs: int
    benchmark_warmup: int
    threads: int | None


@dataclass
class CalibrateConfig:
    """`segkit-calibrate` (conf/calibrate.yaml)."""

    checkpoint: str
    split: str
    dataset: dict[str, Any]  # as in EvaluateConfig
    device: str
    batch_size: int | None
    num_workers: int
    mode: str
    crop_size: list[int] | None
    stride: list[int] | None
    max_pixels: int
    n_bins: int
    seed: int
    progress_bar: bool


def validate_config(cfg: DictConfig) -> None:
    """Check values that depend on each other; raise ConfigError naming the key."""
    trainer, dataset = cfg.trainer, cfg.dataset
    positive = {
        "trainer.batch_size": trainer.batch_size,
        "trainer.max_epochs": trainer.max_epochs,
        "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
        "trainer.val_every_n_epochs": trainer.val_every_n_epochs,
        "trainer.log_every_n_steps": trainer.log_every_n_steps,
        "dataset.num_classes": dataset.num_classes,
        "optimizer.lr": cfg.optimizer.lr,
    }
    for key in ("trainer.max_steps", "trainer.val_batch_size", "trainer.stop_after_steps", "trainer.threads"):
        positive[key] = _select(cfg, key)
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
    if trainer.num_workers < 0:
        raise ConfigError("trainer.num_workers", f"must be >= 0, got {trainer.num_workers}")
    if trainer.precision not in PRECISIONS:
        raise ConfigError("trainer.precision", f"must be one of {', '.join(PRECISIONS)}; got {trainer.precision!r}")
    if trainer.score_at not in ("native", "input"):
        raise ConfigError("trainer.score_at", f"must be native or input; got {trainer.score_at!r}")
    if trainer.inference_mode not in INFERENCE_MODES:
        raise ConfigError("trainer.inference_mode", f"must be one of {', '.join(INFERENCE_MODES)}; got "
                          f"{trainer.inference_mode!r}")
    if trainer.accelerator not in ("auto", "cpu", "cuda"):
        raise ConfigError("trainer.accelerator", f"must be auto, cpu or cuda; got {trainer.accelerator!r}")
    if 0 <= dataset.ignore_index < dataset.num_classes:
        raise ConfigError(
            "dataset.ignore_index",
            f"{dataset.ignore_index} is a real class id (num_classes={dataset.num_classes}); "
            "use a value outside [0, num_classes), e.g. 255",
        )
    names = dataset.class_names
    if names is not None and len(names) != dataset.num_classes:
        raise ConfigError(
            "dataset.class_names", f"has {len(names)} names but dataset.num_classes={dataset.num_classes}"
        )
    if len(dataset.image_size) != 2 or min(dataset.image_size) <= 0:
        raise ConfigError("dataset.image_size", f"must be [height, width] > 0, got {list(dataset.image_size)}")
    crop = _select(cfg, "augmentation.crop_size")
    if crop is not None:
        if len(crop) != 2 or min(crop) <= 0:
            raise ConfigError("augmentation.crop_size", f"must be [height, width] > 0, got {list(crop)}")
        if crop[0] > dataset.image_size[0] or crop[1] > dataset.image_size[1]:
            raise ConfigError(
                "augmentation.crop_size",
                f"{list(crop)} is larger than dataset.image_size {list(dataset.image_size)}; "
                "lower the crop or raise the image size",
            )
    class_uniform = _select(cfg, "augmentation.class_uniform") or 0.0
    if not 0.0 <= class_uniform <= 1.0:
        raise ConfigError("augmentation.class_uniform", f"is the fraction of class-centred crops: [0, 1], got "
                          f"{class_uniform}")
    if class_uniform and crop is None:
        raise ConfigError("augmentation.class_uniform", "centres crops: set augmentation.crop_size too")
    if trainer.inference_mode == "slide" and (crop is None or (crop[0] >= dataset.image_size[0]
                                                              and crop[1] >= dataset.image_size[1])):
        raise ConfigError("trainer.inference_mode", "slide runs windows of augmentation.crop_size: set a crop "
                          "smaller than dataset.image_size, or use auto / whole")
    if trainer.monitor_mode not in ("auto", "max", "min"):
        raise ConfigError("trainer.monitor_mode", f"must be auto, max or min; got {trainer.monitor_mode!r}")
    for key in ("log_images_every_n_val", "log_images_count"):
        if trainer[key] < 0:
            raise ConfigError(f"trainer.{key}", f"must be >= 0, got {trainer[key]}")
    if trainer.save_top_k < 0:
        raise ConfigError("trainer.save_top_k", f"must be >= 0, got {trainer.save_top_k}")
    if trainer.ema_decay is not None and not 0.0 < trainer.ema_decay < 1.0:
        raise ConfigError("trainer.ema_decay", f"must be in (0, 1) (e.g. 0.999) or null, got {trainer.ema_decay}")
    if trainer.resume not in (None, "auto") and not str(trainer.resume).endswith(".pt"):
        raise ConfigError("trainer.resume", f"must be auto or a path to a .pt checkpoint, got {trainer.resume!r}")
    # Last: a loss's mode is an attribute of its class, so this imports the losses (and torch).
    model_classes = _select(cfg, "model.num_classes")
    if model_classes == 1:
        _check_binary_task(cfg)
    elif model_classes is not None and model_classes != dataset.num_classes:
        raise ConfigError(
            "model.num_classes", f"{model_classes} does not match dataset.num_classes={dataset.num_classes} "
            "(or 1 for a binary task with one output)"
        )
    elif _loss_modes(cfg.get("loss")) & {"binary"}:
        raise ConfigError("loss", "a binary loss (one logit per pixel) needs model.num_classes=1")


def _check_binary_task(cfg: DictConfig) -> None:
    """model.num_classes=1: one logit per pixel, foreground where sigmoid > 0.5, on a two-class data set."""
    if cfg.dataset.num_classes != 2:
        raise ConfigError("model.num_classes", f"1 (binary, one logit) needs dataset.num_classes=2 "
                          f"(background, foreground), got {cfg.dataset.num_classes}")
    if modes := _loss_modes(cfg.get("loss")) - {"binary"}:
        raise ConfigError("loss", f"model.num_classes=1 gives one logit per pixel, but the loss has "
                          f"{'/'.join(sorted(modes))} terms; use loss=dice_bce (or mode: binary terms)")


def _loss_modes(node: Any) -> set[str]:
    """'binary' / 'multiclass' / 'multilabel' for every loss term in the config: smp's `mode` key, or
    the `mode` attribute of a loss class registered in segkit.registry."""
    if not hasattr(node, "items"):
        return set()
    modes = {str(node["mode"])} if "mode" in node else set()
    if mode := registry.loss_mode(node.get("_target_")):  # imports only registered loss modules
        modes.add(mode)
    for value in node.values():
        modes |= _loss_modes(value)
    return modes


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with failures reported as one line naming the config key."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, SegkitError):
            raise cause from None
        text = str(cause) if cause is not None else str(error)
        raise ConfigError(key, text.splitlines()[0] if text else type(error).__name__) from None


def monitor_mode(monitor: str, mode: str) -> str:
    """trainer.monitor_mode, with auto = min for losses (names ending in "loss"), max otherwise."""
    if mode == "auto":
        return "min" if monitor.endswith("loss") else "max"
    return mode
