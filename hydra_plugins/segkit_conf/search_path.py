"""Hydra's config search path for segkit: a user's `./conf` over the tree segkit ships (segkit/conf).

Active only where the primary config directory is segkit's own, so every segkit command and
`compose()` on segkit's tree get it, and no other Hydra app in the environment does. A `conf/`
directory in the working directory comes before segkit's: it adds options to segkit's groups
(`conf/dataset/mydata.yaml` is `dataset=mydata`, `conf/experiment/x.yaml` is `experiment=x`) and
replaces an option of the same name. Hydra's `--config-dir` is put before both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "segkit user conf"  # how hydra.runtime.config_sources names the user's directory
USER_CONFIG_DIR = "conf"  # relative to the working directory


def segkit_config_dir() -> Path | None:
    """segkit/conf of the segkit that `import segkit` loads (found without importing it)."""
    spec = importlib.util.find_spec("segkit")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "conf"


def user_config_dir() -> Path | None:
    """./conf, when the working directory has one."""
    candidate = Path.cwd() / USER_CONFIG_DIR
    return candidate.resolve() if candidate.is_dir() else None


class SegkitUserConfig(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        main = next((element.path for element in search_path.get_path() if element.provider == "main"), None)
        if main is None or main.startswith(("pkg://", "structured://")):
            return
        segkit = segkit_config_dir()
        if segkit is None or Path(main.removeprefix("file://")).resolve() != segkit:
            return  # another Hydra app, or a run's own saved config (segkit-reproduce)
        user = user_config_dir()
        if user is not None and user != segkit:
            search_path.prepend(provider=PROVIDER, path=f"file://{user}")
