"""The Hydra side of `hparams_search=optuna`: Hydra only instantiates sweepers from the `hydra_plugins`
namespace, so this thin class lives here and hands everything to segkit.search.Search."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from segkit.search import Search  # importing it registers hydra/sweeper=segkit_optuna


class OptunaSweeper(Sweeper):
    def __init__(self, **sweeper: Any) -> None:
        self.sweeper = OmegaConf.create(sweeper)
        self.search: Search | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                           config=config)
        parser = OverridesParser.create(config_loader=hydra_context.config_loader)
        self.search = Search(self.sweeper, config, launcher, parser.parse_overrides)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.search is not None, "setup() first"
        return self.search.run(arguments)
