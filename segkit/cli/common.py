"""What the entry points share: the conf/ directory, the schema registration, `hydra_main` (Hydra apps
with a fast `--help`) and one-line error reporting.

Nothing here imports torch, and neither may the top of an entry point: `--help`, `--cfg job` and a
config error must answer before torch would have finished loading (tests/test_commands.py). Entry
points import the library where they use it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segkit import registry
from segkit.config import CheckDataConfig, FederatedConfig, PrivacyConfig, TrainConfig
from segkit.errors import SegkitError, one_line

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # segkit/conf, shipped in the wheel
SCHEMA_SUFFIX = "_schema"  # ConfigStore nodes that type a group's options; never an option themselves
HELP_FLAGS = ("--help", "-h")
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
    options (schema nodes left out), then the composed config.

    segkit answers `--help` itself: Hydra's help copies its whole config repository for every group
    it lists (its own hydra/ groups included), which took longer than importing torch. Help with
    Hydra's own flags (--config-dir, ...) still goes to Hydra."""

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T | None]:
        app = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(task)
        doc = (sys.modules[task.__module__].__doc__ or config_name).strip().splitlines()[0]

        @functools.wraps(task)
        def main() -> T | None:
            args = sys.argv[1:]
            overrides = [arg for arg in args if arg not in HELP_FLAGS]
            if len(overrides) < len(args) and not any(arg.startswith("-") for arg in overrides):
                print(run_or_exit(lambda: app_help(config_name, overrides, doc)))
                return None
            return app()

        return main

    return decorate


def app_help(config_name: str, overrides: list[str], description: str) -> str:
    """The text of `--help`: what the command does, the groups of its config with their options, the config."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=config_name):
        cfg = compose(config_name, overrides=overrides)  # a bad override fails here, as it would in the run
    groups = config_groups(config_name)
    lines = [description, ""]
    if groups:
        lines += ["== Configuration groups ==", "Compose your configuration from those groups (group=option)", ""]
        lines += [f"{group}: {', '.join(group_options(group))}" for group in groups]
        lines.append("")
    lines += ["== Config ==", "Override anything in the config (foo.bar=value)", "", OmegaConf.to_yaml(cfg),
              "Hydra's own flags (-m multirun, --cfg job, --config-dir, ...): --hydra-help"]
    return "\n".join(lines)


def config_groups(config_name: str) -> list[str]:
    """The groups conf/<config_name>.yaml composes (its defaults list), Hydra's own left out."""
    defaults = OmegaConf.load(Path(CONFIG_DIR) / f"{config_name}.yaml").get("defaults") or []
    keys = (str(key) for entry in defaults if isinstance(entry, DictConfig) for key in entry)
    groups = {key.removeprefix("override ").split("@")[0].strip("/") for key in keys}
    return sorted(group for group in groups if not group.startswith("hydra/"))


def group_options(group: str) -> list[str]:
    """What `group=...` accepts: conf/<group>/**.yaml (subfolders as `sub/name`) and ConfigStore
    nodes, except schema nodes and shared defaults (`_name`), which are no option of their own."""
    folder = Path(CONFIG_DIR) / group
    names = {str(path.relative_to(folder).with_suffix("")) for path in folder.rglob("*.yaml")}
    with contextlib.suppress(OSError):  # OSError: no node stored in this group
        names.update(name.removesuffix(".yaml") for name in ConfigStore.instance().list(group))
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
