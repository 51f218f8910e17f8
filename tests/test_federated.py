"""federated=...: a real Flower federation of segkit clients — simulation, server and client processes,
a crashed client survived, resume from the last round, shards, FedProx's term, settings refused by key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import segkit
from segkit.errors import ConfigError

from .conftest import ROOT, TINY, one_tensor, read_csv

pytest.importorskip("flwr")

from segkit import federated  # noqa: E402  (after the skip: imports flwr lazily, but reads its strategies)

# 24 images over 3 clients, 2 rounds of 1 local epoch each.
FEDERATION = ["federated=fedavg", "federated.rounds=2", "dataset.train_size=24", "trainer.max_epochs=1",
              "federated.round_timeout_s=120"]


def test_simulation_trains_validates_and_checkpoints_every_round(compose_cfg, tmp_path):
    summary = federated.run(compose_cfg(FEDERATION), tmp_path)
    assert summary is not None and summary["status"] == "FINISHED" and summary["epochs"] == 2
    rounds = read_csv(tmp_path / "epochs.csv")
    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert all(0 <= float(r["val/miou"]) <= 1 and float(r["train/loss"]) > 0 for r in rounds)
    mask = one_tensor(segkit.load(tmp_path / "checkpoints" / "last.pt", device="cpu").predict(torch.rand(3, 32, 32)))
    assert mask.shape == (32, 32)


@pytest.fixture
def client_2_crashes(monkeypatch):
    """Client 2 raises in every fit, as a site whose connection drops mid-round."""
    make_client = federated.make_client

    def fragile(cfg, client_id, output_dir):
        client = make_client(cfg, client_id, output_dir)
        if client_id == 2:
            def crash(parameters, config):
                raise RuntimeError("client 2 lost its connection")
            client.fit = crash
        return client

    monkeypatch.setattr(federated, "make_client", fragile)


def test_a_crashed_client_is_survived_when_the_strategy_allows(compose_cfg, tmp_path, client_2_crashes):
    summary = federated.run(compose_cfg([*FEDERATION, "federated.min_fit_clients=2"]), tmp_path)
    assert summary is not None and summary["status"] == "FINISHED" and len(read_csv(tmp_path / "epochs.csv")) == 2


def test_too_few_clients_end_the_federation_with_a_message(compose_cfg, tmp_path, client_2_crashes):
    with pytest.raises(federated.FederationError, match="min_fit_clients"):
        federated.run(compose_cfg([*FEDERATION, "federated.round_timeout_s=20"]), tmp_path)


def test_a_federation_resumes_after_its_last_round(compose_cfg, tmp_path):
    federated.run(compose_cfg([*FEDERATION, "federated=fedprox", "federated.rounds=1"]), tmp_path)
    summary = federated.run(compose_cfg([*FEDERATION, "federated=fedprox", "trainer.resume=auto"]), tmp_path)
    assert summary is not None and summary["epochs"] == 2
    assert [int(r["round"]) for r in read_csv(tmp_path / "epochs.csv")] == [1, 2]  # round 1 kept, only round 2 run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_server_and_clients_as_separate_processes_over_localhost(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    common = [*TINY, *FEDERATION, "federated.num_clients=2", "federated.rounds=1",
              f"federated.server_address={address}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def start(*overrides: str, run_dir) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, *overrides,
                                 f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    server = start("federated.mode=server", run_dir=tmp_path / "server")
    clients = [start("federated.mode=client", f"federated.client_id={k}", run_dir=tmp_path / f"site{k}")
               for k in range(2)]
    try:
        out, _ = server.communicate(timeout=300)
        assert server.returncode == 0, out[-3000:]
        for client in clients:
            client.wait(timeout=60)
            assert client.returncode == 0
    finally:
        for process in (server, *clients):
            if process.poll() is None:
                process.kill()
    record = json.loads((tmp_path / "server" / "metrics.json").read_text())
    assert record["status"] == "FINISHED" and record["epochs"] == 1
    assert not (tmp_path / "site0" / "checkpoints").exists()  # the sites keep no copy of the global model


def test_shards_cover_the_split_once_and_dirichlet_skews_them(compose_cfg):
    from segkit.data.loading import build_dataset

    cfg = compose_cfg(["dataset.train_size=60"])
    dataset = build_dataset(cfg.dataset, "train")
    classes = np.array(federated.skew_labels(dataset))

    def class_spread(partition: str) -> float:
        fed = OmegaConf.create({"num_clients": 3, "partition": partition, "dirichlet_alpha": 0.1})
        shards = federated.partition(dataset, fed, seed=0)
        assert sorted(i for shard in shards for i in shard) == list(range(60))
        shares = [np.bincount(classes[shard], minlength=4) / len(shard) for shard in shards]
        return float(np.std(shares, axis=0).mean())  # how differently the clients' class mixes look

    assert class_spread("dirichlet") > 2 * class_spread("iid")


def test_a_client_without_data_is_refused_naming_the_key(compose_cfg):
    from segkit.data.loading import build_dataset

    dataset = build_dataset(compose_cfg(["dataset.train_size=2"]).dataset, "train")
    fed = OmegaConf.create({"num_clients": 3, "partition": "iid", "dirichlet_alpha": 0.5})
    with pytest.raises(ConfigError, match=r"federated\.num_clients"):
        federated.partition(dataset, fed, seed=0)


@pytest.mark.parametrize(("override", "key"), [
    ("federated.strategy=FedMagic", "federated.strategy"),
    ("federated.min_fit_clients=5", "federated.min_fit_clients"),
    ("federated.rounds=0", "federated.rounds"),
    ("federated.partition=by_magic", "federated.partition"),
    ("federated.dirichlet_alpha=0", "federated.dirichlet_alpha"),
])
def test_bad_settings_are_one_line_naming_the_key(compose_cfg, override, key):
    overrides = [*FEDERATION, override]
    if "dirichlet" in override:
        overrides.append("federated.partition=dirichlet")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        federated.check_federated_config(compose_cfg(overrides))


def test_fedprox_adds_the_gradient_of_its_proximal_term():
    model = torch.nn.Linear(3, 2)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the gradient is looked at
    optimizer.register_step_pre_hook(federated.fedprox_hook(model, anchor, mu=0.5))
    with torch.no_grad():
        model.weight.add_(1.0)  # moved away from the global weights by 1 everywhere
    model(torch.zeros(1, 3)).sum().backward()  # d/dW of this loss is 0: what remains is the proximal term
    optimizer.step()
    torch.testing.assert_close(model.weight.grad, torch.full_like(model.weight, 0.5))  # mu * (w - w_global)
