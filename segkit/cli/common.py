"""What the entry points share: the conf/ directory, the schema registration, `hydra_main` (Hydra apps
with a fast `--help`) and one-line error reporting.

The config tree ships inside the package (segkit/conf), so every command works from any directory
of an installed segkit. A user's own config directory layers on top: `./conf` in the working
directory (hydra_plugins/segkit_conf puts it on Hydra's search path before segkit's tree) and
Hydra's `--config-dir` (before both) add options to segkit's groups or replace one of the same name.

Nothing here imports torch, and neither may the top of an entry point: `--help`, `--cfg job` and a
config error must answer before torch would have finished loading (tests/test_commands.py). Entry
points import the library where they use it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segkit import registry
from segkit.config import (
    CalibrateConfig,
    CheckDataConfig,
    EvaluateConfig,
    ExportConfig,
    FederatedConfig,
    PredictConfig,
    PrivacyConfig,
    TrainConfig,
)
from segkit.errors import ConfigError, SegkitError, one_line

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # segkit/conf, shipped in the wheel
SCHEMA_SUFFIX = "_schema"  # ConfigStore nodes that type a group's options; never an option themselves
HELP_FLAGS = ("--help", "-h")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # Hydra's: one more config directory, searched first
T = TypeVar("T")


def run_or_exit(job: Callable[[], T]) -> T:
    """Run `job`; a user-fixable error becomes `error: <one line>` on stderr and exit status 2."""
    try:
        return job()
    except (SegkitError, OmegaConfBaseException, HydraException) as error:
        message = one_line(error) if isinstance(error, SegkitError) else str(error).strip().splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def hydra_main(config_name: str) -> Callable[[Callable[[DictConfig], T]], Callable[[], T | None]]:
    """`hydra.main` on conf/<config_name>.yaml, whose `--help` lists the groups a user picks and their
    options (schema nodes left out; the user's ./conf and --config-dir included), then the composed config.

    segkit answers `--help` itself: Hydra's help copies its whole config repository for every group
    it lists (its own hydra/ groups included), which took longer than importing torch. Help with
    Hydra's other flags (--cfg, -m, ...) still goes to Hydra."""

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T | None]:
        register_configs()  # every command's config lists its schema first
        app = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(task)
        doc = (sys.modules[task.__module__].__doc__ or config_name).strip().splitlines()[0]

        @functools.wraps(task)
        def main() -> T | None:
            args, config_dir = split_config_dir(sys.argv[1:])
            overrides = [arg for arg in args if arg not in HELP_FLAGS]
            if len(overrides) < len(args) and not any(arg.startswith("-") for arg in overrides):
                print(run_or_exit(lambda: app_help(config_name, overrides, doc, config_dir)))
                return None
            return app()

        return main

    return decorate


def split_config_dir(args: Sequence[str]) -> tuple[list[str], str | None]:
    """`args` without Hydra's `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`), and DIR."""
    rest, config_dir, args = [], None, list(args)
    while args:
        arg = args.pop(0)
        flag, equals, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            config_dir = value if equals else (args.pop(0) if args else "")
        else:
            rest.append(arg)
    return rest, config_dir


@contextlib.contextmanager
def config_loader(config_name: str = "app", config_dir: str | None = None) -> Iterator[ConfigLoader]:
    """Hydra initialised on segkit's tree as a command would be: the user's ./conf (the search-path
    plugin) before it, and `config_dir` (--config-dir) before both."""
    from hydra import initialize_config_dir
    from hydra._internal.hydra import Hydra  # Hydra 1.3's own way to start on a given search path
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=config_name):
        loader = GlobalHydra.instance().config_loader()
        if config_dir is not None:
            extra = os.path.abspath(os.path.expanduser(config_dir))
            if not os.path.isdir(extra):
                raise ConfigError("--config-dir", f"{extra}: not a directory")
            search_path = loader.get_search_path()
            search_path.prepend(provider="command-line", path=f"file://{extra}")
            GlobalHydra.instance().clear()  # initialize_config_dir restores the state it found on exit
            Hydra.create_main_hydra2(task_name=config_name, config_search_path=search_path)
            loader = GlobalHydra.instance().config_loader()
        yield loader


def app_help(config_name: str, overrides: list[str], description: str, config_dir: str | None = None) -> str:
    """The text of `--help`: what the command does, the groups of its config with their options, the config."""
    with config_loader(config_name, config_dir) as loader:
        from hydra import compose

        cfg = compose(config_name, overrides=overrides)  # a bad override fails here, as it would in the run
        groups = config_groups(loader, config_name)
        options = {group: _group_options(loader, group) for group in groups}
    lines = [description, ""]
    if groups:
        lines += ["== Configuration groups ==", "Compose your configuration from those groups (group=option)", ""]
        lines += [f"{group}: {', '.join(options[group])}" for group in groups]
        lines.append("")
    lines += ["== Config ==", "Override anything in the config (foo.bar=value)", "", OmegaConf.to_yaml(cfg),
              "Hydra's own flags (-m multirun, --cfg job, --config-dir, ...): --hydra-help"]
    return "\n".join(lines)


def config_groups(loader: ConfigLoader, config_name: str) -> list[str]:
    """The groups conf/<config_name>.yaml composes (its defaults list), Hydra's own left out."""
    from hydra.core.default_element import GroupDefault

    primary = loader.repository.load_config(config_name)  # type: ignore[attr-defined]
    defaults = (primary.defaults_list or []) if primary is not None else []
    groups = {entry.group.strip("/") for entry in defaults
              if isinstance(entry, GroupDefault) and entry.group is not None}
    return sorted(group for group in groups if not group.startswith("hydra/"))


def group_options(group: str) -> list[str]:
    """What `group=...` accepts: conf/<group>/**.yaml (subfolders as `sub/name`) in segkit's tree and
    the user's, and ConfigStore nodes, except schema nodes and shared defaults (`_name`), which are no
    option of their own."""
    with config_loader() as loader:
        return _group_options(loader, group)


def _group_options(loader: ConfigLoader, group: str) -> list[str]:
    from hydra.core.object_type import ObjectType

    names = set(loader.get_group_options(group, ObjectType.CONFIG))
    for sub in loader.get_group_options(group, ObjectType.GROUP):
        names.update(f"{sub}/{name}" for name in _group_options(loader, f"{group}/{sub}"))
    return sorted(name for name in names if not name.endswith(SCHEMA_SUFFIX) and not Path(name).name.startswith("_"))


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore, where the configs' defaults lists name them.

    Everything imported here is torch-free: composing a config must answer at once. Dataset schemas
    come from segkit.registry: segkit's formats and those installed packages register."""
    cs = ConfigStore.instance()
    cs.store(name=f"train{SCHEMA_SUFFIX}", node=TrainConfig)
    cs.store(name=f"check_data{SCHEMA_SUFFIX}", node=CheckDataConfig)
    cs.store(group="privacy", name=f"privacy{SCHEMA_SUFFIX}", node=PrivacyConfig)
    cs.store(group="federated", name=f"federated{SCHEMA_SUFFIX}", node=FederatedConfig)
    # The inference commands' entry configs (conf/<name>.yaml list <name>_schema first).
    for name, schema in (("evaluate", EvaluateConfig), ("predict", PredictConfig), ("export", ExportConfig),
                         ("calibrate", CalibrateConfig)):
        cs.store(name=f"{name}{SCHEMA_SUFFIX}", node=schema)
    for name, part in registry.dataset_formats().items():
        cs.store(group="dataset", name=f"{name}{SCHEMA_SUFFIX}", node=part.schema)
    _register_launcher_schemas(cs)


def _register_launcher_schemas(cs: ConfigStore) -> None:
    """conf/hydra/launcher/submitit_{slurm,local}.yaml extend the submitit plugin's configs, stored again
    here under `*_schema` names: a config file of the plugin's own name would hide the plugin's node.
    Stored as plain key sets (Hydra's plugin scan re-imports the plugin, so its dataclasses would not
    match); unknown keys still fail, as Hydra composes in struct mode."""
    try:
        from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    except ImportError:  # the `cluster` extra is not installed: those presets are unavailable
        return
    for name, schema in (("submitit_slurm_schema", SlurmQueueConf), ("submitit_local_schema", LocalQueueConf)):
        cs.store(group="hydra/launcher", name=name, node=OmegaConf.to_container(OmegaConf.structured(schema)),
                 provider="segkit")
