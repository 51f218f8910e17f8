"""Configs from files someone else may have written are data: checked against an allowlist before anything is built.

A checkpoint carries the config it was trained with, a run directory its `.hydra/config.yaml`.
Handing such a config to `hydra.utils.instantiate` would call whatever its author put under
`_target_` (Hydra's own blocklist stops only a few obvious names). So before segkit builds anything
from such a file, the whole node is checked, and what gets built is exactly what was checked:

- every `_target_` must be on the allowlist for that use. From a checkpoint segkit builds two things:
  `model` (segkit's model builder, which picks smp / torchvision architectures and timm encoders by
  name) and, in segkit-evaluate, `dataset` (a registered reader); neither may hold another Hydra key
  (`_target_`, `_partial_`, `_args_`, `_recursive_`, `_convert_`) anywhere inside. A run config may
  also name the optimizers, schedules, losses, augmentations and trackers registered in
  segkit.registry (segkit's own, and those of packages installed here). Deciding imports nothing
  the file names;
- interpolations may point at other keys of the same file, and use only the resolvers allowed for
  that use: none in a checkpoint (its config is stored resolved) and none in a run config that
  segkit-reproduce trains from (`foreign_run_config`, which also reads it as data, never through Hydra);
  `check_run_config` alone allows RUN_RESOLVERS.
  `oc.create` / `oc.decode` would build new nodes from strings and are refused;
- the model builder's arguments may not reach files or the network: the encoder must be a timm model
  name (no `hf-hub:` / `local-dir:`), and `model.options` may not name weights or checkpoints;
- paths in the file are never written to: a checkpoint's `dataset.cache_dir` is dropped; in a run
  config the places training writes (`output_root`, tracker directories, `dataset.cache_dir`) must be
  relative paths below the working directory or on the run directory's own path (a run's output_root
  holds it), and no tracker may send to a server the file names.

A refusal is one line naming the file, the key and the value; nothing has been called or written.
Whoever trusts a file skips all of this: `segkit.load(path, trust=True)`, `trust_checkpoint=true`
on segkit-predict / segkit-evaluate / segkit-export, `segkit-reproduce --trust`.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, grammar_parser
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from segkit import registry
from segkit.errors import CheckpointError, UntrustedConfigError

CHECKPOINT_HINT = "segkit.load(path, trust=True), or trust_checkpoint=true on segkit-predict/-evaluate/-export"
RUN_HINT = "segkit-reproduce --trust"

# The allowlists are segkit.registry's parts: segkit's own and those the user's installed packages
# register (the `segkit.parts` entry points), never a module a file names. A checkpoint's `model` and
# `dataset` sections build a part of that kind each; a run config may name a part of any kind.
CHECKPOINT_SECTIONS = ("model", "dataset")
# `<module>.<Class>`: one name directly after the module (so `kornia.augmentation.torch.load`, an
# attribute path through a re-exported module, is no member), naming a class derived from the base.
TARGET_FAMILIES = {
    "torch.optim": ("torch.optim", "Optimizer"),
    "kornia.augmentation": ("torch.nn", "Module"),
    "segmentation_models_pytorch.losses": ("torch.nn", "Module"),
}
HYDRA_KEY = re.compile(r"^_\w+_$")  # _target_, _partial_, _args_, _recursive_, _convert_ (and future ones)
# hydra: (the run's own Hydra settings), now: (a time stamp), oc.env / oc.select (values, not nodes).
RUN_RESOLVERS = frozenset({"hydra", "now", "oc.env", "oc.select"})
# Keyword arguments that make timm / smp / torchvision read or download weights.
WEIGHT_OPTIONS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                            "encoder_weights", "weights", "weights_backbone", "cache_dir"})
WRITE_PATHS = ("output_root", "dataset.cache_dir", "logger.*.output_root", "logger.*.subdir")
SEND_TO = ("logger.*.tracking_uri", "logger.*.entity")


class _Check:
    """Raises the one-line refusal for `source`, except for keys the user set on the command line."""

    def __init__(self, source: str, hint: str, user_keys: Iterable[str] = ()) -> None:
        self.source, self.hint, self.user_keys = source, hint, tuple(user_keys)

    def refuse(self, key: str, value: Any, why: str) -> None:
        if any(key == k or key.startswith((f"{k}.", f"{k}[")) for k in self.user_keys):
            return  # the user's own value, not the file's
        raise UntrustedConfigError(f"{self.source}: {key}: {_short(value)} refused ({why}); nothing was built. "
                                   f"If you trust this file: {self.hint}")


def checked_checkpoint_config(cfg: DictConfig, source: str) -> DictConfig:
    """A checkpoint's stored config, resolved, once building its model and dataset calls only allowlisted code."""
    check = _Check(source, CHECKPOINT_HINT)
    raw = OmegaConf.to_container(cfg, resolve=False)
    _check_resolvers(raw, frozenset(), check)
    try:
        plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as error:
        raise CheckpointError(f"{source}: stored config does not resolve ({str(error).splitlines()[0]})") from None
    for section in CHECKPOINT_SECTIONS:
        allowed = registry.targets(section)
        node = plain.get(section)
        if not isinstance(node, dict):
            raise CheckpointError(f"{source}: stored config has no {section} mapping")
        target = node.get("_target_")
        if target not in allowed:
            check.refuse(f"{section}._target_", target, f"the allowlist for {section}: {', '.join(sorted(allowed))}")
        for key, name, value in _entries(node, section):
            if HYDRA_KEY.match(name) and key != f"{section}._target_":
                check.refuse(key, value, f"a checkpoint's {section} holds data only, no Hydra key that calls "
                                         "or changes a call")
    _check_model_arguments(plain["model"], check)
    if isinstance(plain["dataset"], dict) and plain["dataset"].get("cache_dir") is not None:
        plain["dataset"]["cache_dir"] = None  # a path from the file is never written to
    return OmegaConf.create(plain)


def check_run_config(path: str, overrides: Sequence[str] = ()) -> None:
    """Refuse a run directory's `.hydra/config.yaml` (with the user's `overrides` applied) that builds
    anything off the allowlist, writes outside the working directory or sends data to a server it names."""
    user_keys = [_override_key(o) for o in overrides]
    check = _Check(path, RUN_HINT, user_keys)
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as error:
        raise UntrustedConfigError(f"{path}: not a readable config ({str(error).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise UntrustedConfigError(f"{path}: not a mapping of config keys")
    _check_run(cfg, path, overrides, check, RUN_RESOLVERS)


def _check_run(cfg: DictConfig, path: str, overrides: Sequence[str], check: _Check,
               resolvers: frozenset[str]) -> None:
    for key in ("defaults", "hydra"):  # a saved config.yaml has neither: they would steer Hydra itself
        if key in cfg:
            check.refuse(key, "...", "a saved run config has no defaults list or hydra node")
    _apply_overrides(cfg, overrides)
    raw = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
    _check_resolvers(raw, resolvers, check)
    for key, name, value in _entries(raw, ""):
        if name == "_target_" and not allowed_training_target(value):
            check.refuse(key, value, "not a model builder, data set reader, optimizer, schedule, loss, "
                                     "augmentation or tracker on segkit's allowlist")
    if isinstance(raw.get("model"), dict) and registry.find(raw["model"].get("_target_"), "model"):
        try:
            model = cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True))
        except OmegaConfBaseException as error:
            check.refuse("model", "...", f"it cannot be checked before the run ({str(error).splitlines()[0]})")
        else:
            _check_model_arguments(model, check)
    _check_destinations(cfg, Path(path).resolve().parent.parent, check)


def allowed_training_target(target: Any) -> bool:
    """Whether a run config may name `target`; imports only the allowlisted family modules."""
    if not isinstance(target, str):
        return False
    if target in registry.targets(*registry.KINDS):
        return True
    module, _, name = target.rpartition(".")
    if module not in TARGET_FAMILIES or not name.isidentifier() or name.startswith("_"):
        return False
    base_module, base_name = TARGET_FAMILIES[module]
    found = getattr(importlib.import_module(module), name, None)
    base = getattr(importlib.import_module(base_module), base_name)
    return isinstance(found, type) and issubclass(found, base)


def _check_model_arguments(model: dict[str, Any], check: _Check) -> None:
    """segkit.models.build_model's arguments: an encoder timm knows by name, options that name no files."""
    import timm

    backbone = model.get("backbone")
    name = backbone.get("name") if isinstance(backbone, dict) else None
    if not (isinstance(name, str) and timm.is_model(name)):
        check.refuse("model.backbone.name", name, "not a timm model name (hub and local-directory names "
                                                  "download or read files)")
    for key, option, value in _entries(model.get("options") or {}, "model.options"):
        if option in WEIGHT_OPTIONS:
            check.refuse(key, value, "it would make the encoder read or download weights")


def _check_resolvers(node: Any, allowed: frozenset[str], check: _Check) -> None:
    for key, _, value in _entries(node, ""):
        if isinstance(value, str) and "${" in value:
            for resolver in _resolver_names(value):
                if resolver not in allowed:
                    names = ", ".join(sorted(allowed)) or "none, only plain ${key} references"
                    check.refuse(key, value, f"the resolver {resolver!r} is not allowed here (allowed: {names})")


def _resolver_names(text: str) -> list[str]:
    """Resolvers an OmegaConf string calls, nested ones included; escaped `\\${` is plain text."""
    try:
        tree = grammar_parser.parse(text)
    except GrammarParseError:
        return ["<unparsable interpolation>"]
    names, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names.append(node.resolverName().getText())
        stack.extend(node.getChild(i) for i in range(getattr(node, "getChildCount", lambda: 0)()))
    return names


def _check_destinations(cfg: DictConfig, run_dir: Path, check: _Check) -> None:
    for pattern, sends in [(p, False) for p in WRITE_PATHS] + [(p, True) for p in SEND_TO]:
        for key in _expand(cfg, pattern, check):
            try:
                value = OmegaConf.select(cfg, key, default=None)
            except OmegaConfBaseException as error:
                check.refuse(key, "...", f"it cannot be checked before the run ({str(error).splitlines()[0]})")
                continue
            if value is None:
                continue
            if sends:
                check.refuse(key, value, "training would send data to a server the file names")
            elif not _writable_place(str(value), run_dir):
                check.refuse(key, value, "training writes there; a path from the file must be relative (below the "
                                         "working directory) or on the run directory's own path")


def _writable_place(path: str, run_dir: Path) -> bool:
    """Relative without `..`, or an absolute directory that holds the run directory or lies inside it
    (a run's output_root holds its run directory), but never the file system root."""
    if "://" in path or path.startswith("~"):
        return False
    place = PurePath(path)
    if not place.is_absolute():
        return ".." not in place.parts
    place = Path(os.path.normpath(place))
    return len(place.parts) > 1 and (place in run_dir.parents or place == run_dir or run_dir in place.parents)


def _expand(cfg: DictConfig, pattern: str, check: _Check) -> list[str]:
    """`logger.*.subdir` -> that key for each tracker in cfg; a plain key as it is.

    A tracker named by a non-string key (`7:`, a `!!binary` one) is refused: no key path reaches it, so
    `OmegaConf.select` would find nothing there and its value would go unchecked."""
    head, star, tail = pattern.partition(".*.")
    group = cfg.get(head) if star else None
    if not star or not isinstance(group, DictConfig):
        return [pattern] if not star else []
    names = [name for name, node in group.items_ex(resolve=False) if isinstance(node, DictConfig) and tail in node]
    for name in names:
        if not isinstance(name, str):
            check.refuse(f"{head}.{name!s}", name, "not a string key; its settings cannot be checked")
    return [f"{head}.{name}.{tail}" for name in names if isinstance(name, str)]


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """The user's `key=value` overrides as Hydra applies them, so their values are what gets checked.
    One Hydra cannot parse or apply is left for Hydra to report when the run composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException:
            continue
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra."):
            continue
        try:
            if not override.is_delete():
                OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
            else:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if isinstance(node, DictConfig) and leaf in node:
                    del node[leaf]
        except OmegaConfBaseException:
            continue


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _entries(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted key, last key, value) for every mapping entry and list item at any depth ("" names an item)."""
    if isinstance(node, dict):
        items = [(f"{path}.{name}" if path else str(name), str(name), value) for name, value in node.items()]
    elif isinstance(node, list):
        items = [(f"{path}[{index}]", "", value) for index, value in enumerate(node)]
    else:
        return
    for key, name, value in items:
        yield key, name, value
        yield from _entries(value, key)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------- a foreign run config, parsed as data
MAX_CONFIG_BYTES = 1 << 20  # a saved config.yaml is a few KiB
MAX_DEPTH = 32  # nesting of mappings and lists
# Sizes a run config may ask for before training would allocate them; the user's own override of the key
# is never refused (that is the way to raise one).
RUN_LIMITS = {
    "trainer.batch_size": 1024, "trainer.val_batch_size": 1024, "trainer.accumulate_grad_batches": 1024,
    "trainer.max_epochs": 100_000, "dataset.num_classes": 10_000, "dataset.train_size": 1_000_000,
    "dataset.val_size": 1_000_000, "trainer.num_workers": 64,
}
MAX_PIXELS = 16384 * 16384  # dataset.image_size and augmentation.crop_size: height x width


def foreign_run_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A run directory's `.hydra/config.yaml` read as data into segkit's TrainConfig schema, then checked.

    Never composed by Hydra (a `# @package` header, a `hydra` node or a defaults list are refused), no YAML
    tag beyond plain values and no alias, no resolver at all (`${oc.env:...}` is refused, never resolved:
    plain `${key}` references only), no key outside the schema, sizes within RUN_LIMITS, plus every check
    of `check_run_config`. The paths training writes to come from the caller: `output_root` is reset to
    its default unless `overrides` set it, `dataset.cache_dir` and `trainer.resume` are dropped."""
    import yaml

    from segkit.config import TrainConfig
    from segkit.safe_files import PLAIN_TAGS

    path = str(path)
    user_keys = [_override_key(o) for o in overrides]
    check = _Check(path, RUN_HINT, user_keys)
    text = _read_small_text(Path(path))
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip("# ").startswith("@package") and line.lstrip().startswith("#"):
            raise UntrustedConfigError(f"{path}: line {number}: a '# @package' header refused (it would move "
                                       f"the keys inside Hydra's own config); a saved run config has none. "
                                       f"If you trust this file: {RUN_HINT}")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise UntrustedConfigError(f"{path}: line {event.start_mark.line + 1}: a YAML alias refused (aliases "
                                           "can expand a small file into a huge config); a saved run config has none")
            tag = getattr(event, "tag", None)
            if tag and tag not in PLAIN_TAGS:
                raise UntrustedConfigError(f"{path}: line {event.start_mark.line + 1}: YAML tag {tag!r} refused; "
                                           "a saved run config holds plain values only")
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UntrustedConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UntrustedConfigError(f"{path}: not a mapping of config keys")
    _check_depth(data, path)
    try:
        cfg = OmegaConf.create(data)
    except OmegaConfBaseException as error:
        raise UntrustedConfigError(f"{path}: not a config ({str(error).splitlines()[0]})") from None
    _check_run(cfg, path, overrides, check, frozenset())
    try:
        checked = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))  # a mapping merged into one
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", "") or "?"
        raise UntrustedConfigError(f"{path}: {key}: refused, not a key or value of segkit's training config "
                                   f"({str(error).splitlines()[0]}). If you trust this file: {RUN_HINT}") from None
    _check_sizes(checked, check)
    if "output_root" not in user_keys:
        checked.output_root = TrainConfig.output_root  # where training writes is the user's choice
    if OmegaConf.select(checked, "dataset.cache_dir", default=None) is not None and \
            "dataset.cache_dir" not in user_keys:
        checked.dataset.cache_dir = None
    if "trainer.resume" not in user_keys and "resume" in checked.trainer:
        checked.trainer.resume = None
    return checked


def _read_small_text(path: Path) -> str:
    """A run file: a regular file (not a link to one, a fifo or a device), at most MAX_CONFIG_BYTES."""
    import stat

    try:
        info = os.lstat(path)
    except OSError as error:
        raise UntrustedConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedConfigError(f"{path}: not a regular file (a link, fifo or device); a run's files are "
                                   "plain files")
    if info.st_size > MAX_CONFIG_BYTES:
        raise UntrustedConfigError(f"{path}: {info.st_size} bytes, more than a run config's "
                                   f"{MAX_CONFIG_BYTES} (segkit.runs.trusted.MAX_CONFIG_BYTES)")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    try:
        return data[:MAX_CONFIG_BYTES].decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedConfigError(f"{path}: not UTF-8 text") from None


def _check_depth(node: Any, source: str, depth: int = 0, key: str = "") -> None:
    if depth > MAX_DEPTH:
        raise UntrustedConfigError(f"{source}: {key or 'the config'}: nested more than {MAX_DEPTH} levels deep "
                                   "(segkit.runs.trusted.MAX_DEPTH); a run config is a few levels deep")
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for name, value in children:
        _check_depth(value, source, depth + 1, f"{key}.{name}" if key else str(name))


def _check_sizes(cfg: DictConfig, check: _Check) -> None:
    for key, limit in RUN_LIMITS.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            check.refuse(key, value, f"more than {limit}; set {key}=... yourself on the command line to use it")
    for key in ("dataset.image_size", "augmentation.crop_size"):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False)
        if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_interpolation(node, leaf):
            continue  # absent, or a reference to a key checked itself (the crop follows dataset.image_size)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        sizes = list(value) if not isinstance(value, (int, str)) else [value, value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            continue
        pixels = 1
        for v in sizes:
            pixels *= max(int(v), 1)
        if pixels > MAX_PIXELS:
            check.refuse(key, list(sizes), f"more than {MAX_PIXELS} pixels per image; set {key}=... yourself "
                                           "on the command line to use it")
