"""Federated training with Flower: a server strategy and N clients, each training segkit's own loop.

`python train.py federated=fedavg` runs the whole federation on one machine: Flower's server in this
process and `federated.num_clients` Flower clients in threads, talking gRPC over localhost — the same
code a deployment runs as separate processes (`federated.mode=server` on one machine,
`federated.mode=client federated.client_id=K` on each site). Flower does the federating (strategies
FedAvg, FedProx, FedAdam, FedYogi, FedMedian, ... by name; client sampling, failures, rounds); this
module is the glue:

- `partition` splits the training set into one shard per client: IID, or Dirichlet-skewed by each
  image's rarest present class (non-IID), seeded, so every process computes the same shards.
- `SegkitClient` trains `federated.local_epochs` epochs of the ordinary Trainer on its shard each
  round (with privacy=dp it is a DP-SGD client); FedProx's proximal term is added to the gradients by
  an optimizer pre-step hook, so the loop itself does not change.
- `GlobalModel` validates the aggregated model after every round with the trainer's validation (the
  native-resolution protocol), logs it and the clients' metrics to the trackers, and checkpoints it;
  a federation resumes from its last round with `trainer.resume=auto`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segkit.errors import ConfigError, SegkitError
from segkit.trackers.base import Trackers, build_trackers

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here; Flower would try to report usage
log = logging.getLogger(__name__)
logging.getLogger("flwr").setLevel(logging.WARNING)  # its per-message INFO lines would drown the round results

STRATEGIES = ("FedAvg", "FedProx", "FedAdam", "FedAdagrad", "FedYogi", "FedAvgM", "FedMedian", "FedTrimmedAvg",
              "Krum", "QFedAvg")


class FederationError(SegkitError):
    """The federation could not run (too few clients connected, a round failed everywhere)."""


def check_federated_config(cfg: DictConfig) -> None:
    fed = cfg.federated
    if fed.strategy not in STRATEGIES:
        raise ConfigError("federated.strategy", f"must be one of {', '.join(STRATEGIES)}; got {fed.strategy!r}")
    for key in ("num_clients", "rounds", "local_epochs"):
        if fed[key] < 1:
            raise ConfigError(f"federated.{key}", f"must be >= 1, got {fed[key]}")
    if fed.min_fit_clients is not None and not 1 <= fed.min_fit_clients <= fed.num_clients:
        raise ConfigError("federated.min_fit_clients", f"must be in [1, num_clients={fed.num_clients}], "
                                                       f"got {fed.min_fit_clients}")
    if fed.partition not in ("iid", "dirichlet"):
        raise ConfigError("federated.partition", f"must be iid or dirichlet, got {fed.partition!r}")
    if fed.partition == "dirichlet" and fed.dirichlet_alpha <= 0:
        raise ConfigError("federated.dirichlet_alpha", f"must be > 0, got {fed.dirichlet_alpha}")
    if fed.mode not in ("simulation", "server", "client"):
        raise ConfigError("federated.mode", f"must be simulation, server or client, got {fed.mode!r}")
    if fed.mode == "client" and not 0 <= fed.client_id < fed.num_clients:
        raise ConfigError("federated.client_id", f"must be in [0, {fed.num_clients}), got {fed.client_id}")
    if cfg.trainer.accumulate_grad_batches != 1 and fed.strategy == "FedProx":
        raise ConfigError("trainer.accumulate_grad_batches", "must be 1 with FedProx (the proximal term is added "
                                                             "once per optimizer step)")


def min_fit_clients(fed: DictConfig) -> int:
    return fed.num_clients if fed.min_fit_clients is None else fed.min_fit_clients


# ---------------------------------------------------------------------------------------------- shards


def skew_labels(dataset: Any) -> list[int]:
    """Each image's rarest present class (fewest images in the split contain it): the label a non-IID
    split skews by. Not the most frequent class, which in most segmentation sets is the background."""
    present = []
    for index in range(len(dataset)):
        mask = dataset[index][1]
        values = mask[mask != dataset.ignore_index].unique().tolist()
        present.append([v for v in values if 0 <= v < dataset.num_classes])
    images_with = np.bincount([c for classes in present for c in classes], minlength=dataset.num_classes)
    return [min(classes, key=lambda c: (images_with[c], c)) if classes else 0 for classes in present]


def partition(dataset: Any, fed: DictConfig, seed: int) -> list[list[int]]:
    """One list of training indices per client; every client gets at least one image or the key is named."""
    rng = np.random.default_rng(seed)
    count = fed.num_clients
    if fed.partition == "iid":
        shards = [sorted(part.tolist()) for part in np.array_split(rng.permutation(len(dataset)), count)]
    else:  # Dirichlet over clients for each class: small alpha = each client sees few classes
        shards = [[] for _ in range(count)]
        classes = np.array(skew_labels(dataset))
        for cls in np.unique(classes):
            members = rng.permutation(np.flatnonzero(classes == cls))
            cuts = (np.cumsum(rng.dirichlet([fed.dirichlet_alpha] * count)) * len(members)).astype(int)[:-1]
            for client, part in enumerate(np.split(members, cuts)):
                shards[client] += part.tolist()
        shards = [sorted(shard) for shard in shards]
    for client, shard in enumerate(shards):
        if not shard:
            key = "federated.dirichlet_alpha" if fed.partition == "dirichlet" else "federated.num_clients"
            raise ConfigError(key, f"client {client} got no training images ({len(dataset)} images over {count} "
                                   f"clients); raise dirichlet_alpha or lower num_clients")
    return shards


def weights_of(model: torch.nn.Module) -> list[np.ndarray]:
    return [value.detach().cpu().numpy() for value in model.state_dict().values()]


def load_weights(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    state = OrderedDict((key, torch.from_numpy(np.asarray(array)).to(value.dtype))
                        for (key, value), array in zip(model.state_dict().items(), arrays, strict=True))
    model.load_state_dict(state)


def fedprox_hook(model: torch.nn.Module, global_weights: dict[str, torch.Tensor], mu: float):
    """An optimizer pre-step hook adding mu * (w - w_global): the gradient of FedProx's mu/2 ||w - w_global||^2."""

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    parameter.grad.add_(parameter - global_weights[name], alpha=mu)

    return hook


# ---------------------------------------------------------------------------------------------- client


def client_config(cfg: DictConfig) -> DictConfig:
    """A client trains without trackers or checkpoints of its own; its LR schedule spans all rounds."""
    local = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    local["logger"] = None
    local["trainer"]["max_epochs"] = cfg.federated.rounds * cfg.federated.local_epochs
    local["trainer"]["save_checkpoints"] = False
    local["trainer"]["resume"] = None
    local["trainer"]["progress_bar"] = False
    return OmegaConf.create(local)


def make_client(cfg: DictConfig, client_id: int, output_dir: Path):
    """A Flower client wrapping segkit's Trainer on shard `client_id`."""
    from flwr.client import NumPyClient

    from segkit.data.loading import build_dataset
    from segkit.engine.trainer import Trainer

    class SegkitClient(NumPyClient):
        def __init__(self) -> None:
            shards = partition(build_dataset(cfg.dataset, "train"), cfg.federated, cfg.trainer.seed)
            self.trainer = Trainer(client_config(cfg), output_dir / "clients" / str(client_id),
                                   train_indices=shards[client_id])
            self.prox_handle: RemovableHandle | None = None

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return weights_of(self.trainer.parts.model)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
            parts = self.trainer.parts
            load_weights(parts.model, parameters)
            mu = float(config.get("proximal_mu", 0.0))
            if self.prox_handle is not None:
                self.prox_handle.remove()
                self.prox_handle = None
            if mu > 0:
                anchor = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
                self.prox_handle = parts.optimizer.register_step_pre_hook(fedprox_hook(parts.model, anchor, mu))
            stats = self.trainer.train_epochs(cfg.federated.local_epochs)
            metrics = {"client": client_id, "train_loss": float(stats["train/loss"])}
            if parts.private is not None:
                metrics["epsilon"] = parts.private.epsilon()
            return weights_of(parts.model), len(parts.train_set), metrics

    return SegkitClient()


# ---------------------------------------------------------------------------------------------- server


class GlobalModel:
    """The server's view: validates, logs and checkpoints the aggregated model after each round."""

    def __init__(self, cfg: DictConfig, output_dir: Path, trackers: Trackers) -> None:
        from segkit.engine.trainer import Trainer

        server_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        # A federation resumes from its last round with trainer.resume=auto: the keeper restores the
        # global model, the round count (as epochs) and the record of the rounds so far.
        server_cfg["trainer"]["resume"] = "auto" if cfg.trainer.resume == "auto" else None
        server_cfg["trainer"]["max_epochs"] = cfg.federated.rounds
        self.trainer = Trainer(OmegaConf.create(server_cfg), output_dir, trackers=trackers)
        self.cfg, self.output_dir = cfg, output_dir
        self.rounds_done = self.trainer.epoch
        if self.rounds_done:
            log.info("federation resumed after round %d", self.rounds_done)
        self.clients_train_loss: float | None = None  # the last round's, sample-weighted over the clients
        self.aggregated = False  # did this round's client updates reach the global model?

    def evaluate(self, server_round: int, parameters: list[np.ndarray], _config: dict[str, Any]):
        """Flower's centralized evaluation: round 0 is the initial model, skipped."""
        if server_round == 0:
            return None
        if not self.aggregated:  # Flower evaluates even when a round got no update (too few clients answered)
            log.warning("round %d: no client update reached the server", self.rounds_done + server_round)
            return None
        self.aggregated = False
        load_weights(self.trainer.parts.model, parameters)
        round_number = self.rounds_done + server_round
        self.trainer.epoch, self.trainer.global_step = round_number - 1, round_number
        record: dict[str, Any] = {"round": round_number, "train/loss": self.clients_train_loss}
        record.update(self.trainer.validate_epoch(record))
        self.trainer.end_epoch(record)  # epoch becomes round_number; last.pt
        return 0.0, {k: v for k, v in record.items() if isinstance(v, float)}

    def client_metrics(self, metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        """Per-client fit metrics to the trackers, and their sample-weighted mean back to Flower."""
        step = self.trainer.global_step + 1
        for _samples, values in metrics:
            client = int(values["client"])
            self.trainer.trackers.log_metrics({f"client{client}/{k}": float(v) for k, v in values.items()
                                               if k != "client"}, step)
        total = sum(samples for samples, _ in metrics) or 1
        self.aggregated = True
        self.clients_train_loss = sum(samples * float(v["train_loss"]) for samples, v in metrics) / total
        return {"train_loss": self.clients_train_loss}


def build_strategy(cfg: DictConfig, model: GlobalModel):
    import flwr.server.strategy as strategies
    from flwr.common import ndarrays_to_parameters

    fed = cfg.federated
    needed = min_fit_clients(fed)
    options = dict(cast(dict[str, Any], OmegaConf.to_container(fed.strategy_options, resolve=True)) or {})
    if fed.strategy == "FedProx":
        options.setdefault("proximal_mu", fed.proximal_mu)
    try:
        return getattr(strategies, fed.strategy)(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=needed, min_evaluate_clients=0,
            min_available_clients=needed, evaluate_fn=model.evaluate, accept_failures=True,
            initial_parameters=ndarrays_to_parameters(weights_of(model.trainer.parts.model)),
            fit_metrics_aggregation_fn=model.client_metrics, **options)
    except TypeError as error:
        raise ConfigError("federated.strategy_options", str(error).splitlines()[0]) from None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bounded_client_manager(timeout_s: float):
    """Flower's client manager, waiting at most `timeout_s` (not its default day) for clients to connect."""
    from flwr.server import SimpleClientManager

    class BoundedClientManager(SimpleClientManager):
        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            return super().wait_for(num_clients, timeout=int(timeout_s))

    return BoundedClientManager()


def run_server(cfg: DictConfig, model: GlobalModel, output_dir: Path, address: str) -> dict[str, Any]:
    from flwr.server import ServerConfig, start_server

    remaining = cfg.federated.rounds - model.rounds_done
    model.trainer.trackers.start(output_dir, {"federated.strategy": cfg.federated.strategy},
                                 {"device": str(model.trainer.device)})
    status = "FAILED"
    try:
        if remaining > 0:
            start_server(server_address=address, strategy=build_strategy(cfg, model),
                         client_manager=bounded_client_manager(cfg.federated.round_timeout_s),
                         config=ServerConfig(num_rounds=remaining, round_timeout=cfg.federated.round_timeout_s))
        if len(model.trainer.record.history) < cfg.federated.rounds:
            raise FederationError(f"the federation ended after {len(model.trainer.record.history)} of "
                                  f"{cfg.federated.rounds} rounds: fewer than federated.min_fit_clients="
                                  f"{min_fit_clients(cfg.federated)} clients answered; resume with trainer.resume=auto")
        status = "FINISHED"
    finally:
        model.trainer.epoch = len(model.trainer.record.history)
        summary = model.trainer.write_summary(status)  # "epochs" counts rounds
        model.trainer.trackers.finish(status)
    return summary


def run_client(cfg: DictConfig, output_dir: Path, client_id: int, address: str) -> None:
    from flwr.client import start_client

    client = make_client(cfg, client_id, output_dir)
    start_client(server_address=address, client=client.to_client(), insecure=True,
                 max_wait_time=float(cfg.federated.round_timeout_s))


def simulated_client(cfg: DictConfig, output_dir: Path, client_id: int, address: str) -> None:
    """A client thread of the simulation: a crash ends this client only, in one line, like a lost site."""
    try:
        run_client(cfg, output_dir, client_id, address)
    except Exception as error:  # noqa: BLE001 - any failure is this client's; the strategy decides what follows
        log.warning("client %d stopped: %s", client_id, str(error).splitlines()[0] if str(error) else error)


def run(cfg: DictConfig, output_dir: str | Path, trackers: Trackers | None = None) -> dict[str, Any] | None:
    """`python train.py federated=...`: the simulation, or one side of a deployment.

    `trackers`: where the server tracks the federation; by default those of the config's `logger` node."""
    check_federated_config(cfg)
    output_dir = Path(output_dir)
    fed = cfg.federated
    if fed.mode == "client":
        run_client(cfg, output_dir, fed.client_id, fed.server_address)
        return None
    # Flower's modules imported here, once: client threads importing them alongside the server deadlock
    # on Python's import lock. The shards computed once up front: a client without data fails at start.
    import flwr.client  # noqa: F401
    import flwr.server  # noqa: F401

    from segkit.data.loading import build_dataset

    partition(build_dataset(cfg.dataset, "train"), fed, cfg.trainer.seed)
    if trackers is None:
        trackers = build_trackers(cfg.get("logger"))
    model = GlobalModel(cfg, output_dir, trackers)  # built before any client waits on the server
    if fed.mode == "server":
        return run_server(cfg, model, output_dir, fed.server_address)
    address = f"127.0.0.1:{free_port()}"
    clients = [threading.Thread(target=simulated_client, args=(cfg, output_dir, client, address), daemon=True,
                                name=f"client{client}") for client in range(fed.num_clients)]
    for thread in clients:
        thread.start()
    return run_server(cfg, model, output_dir, address)
