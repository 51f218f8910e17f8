"""What the entry points share: the conf/ directory, the schema registration and one-line error reporting."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segkit.config import CheckDataConfig, FederatedConfig, PrivacyConfig, TrainConfig
from segkit.errors import SegkitError, one_line

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
T = TypeVar("T")


def run_or_exit(job: Callable[[], T]) -> T:
    """Run `job`; a user-fixable error becomes `error: <one line>` on stderr and exit status 2."""
    try:
        return job()
    except (SegkitError, OmegaConfBaseException) as error:
        message = one_line(error) if isinstance(error, SegkitError) else str(error).splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def json_safe(value: Any) -> Any:
    """NaN (a class with no pixels) becomes null, so the files are strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def register_configs() -> None:
    # Reader schemas live next to their readers (they extend the dataclasses above with the
    # reader's own keys and the base-class options); imported here, after this module is loaded.
    from segkit.data.readers.cityscapes import CityscapesSchema
    from segkit.data.readers.coco import CocoSchema
    from segkit.data.readers.folder import FolderSchema
    from segkit.data.readers.synthetic import SyntheticSchema
    from segkit.data.readers.voc import VocSchema

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="check_data_schema", node=CheckDataConfig)
    cs.store(group="privacy", name="privacy_schema", node=PrivacyConfig)
    cs.store(group="federated", name="federated_schema", node=FederatedConfig)
    for name, schema in (
        ("synthetic", SyntheticSchema), ("folder", FolderSchema), ("voc", VocSchema),
        ("cityscapes", CityscapesSchema), ("coco", CocoSchema),
    ):
        cs.store(group="dataset", name=f"{name}_schema", node=schema)
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
