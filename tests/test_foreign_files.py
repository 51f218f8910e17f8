"""Foreign files are data at every entry point: a corpus of crafted run directories, checkpoints, images,
studies and stores (builders in tests/foreign_corpus.py).

Each case asserts that nothing outside the named paths changed (a sentinel file stays as it was, nothing
appears through a planted symlink), that no code a file named ran (a gadget would create a marker file),
and, where segkit refuses, one line naming the file or key. Bombs are refused before allocating: from
headers and archive directories, never by decoding.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from omegaconf import OmegaConf

from segkit import safe_files
from segkit.cli import report
from segkit.cli import reproduce as reproduce_cli
from segkit.engine.reproduce import default_out
from segkit.engine.run_lock import RunLock
from segkit.errors import CheckpointError, DataError, SegkitError
from segkit.runs.checkpoint import load_checkpoint, save_checkpoint
from segkit.runs.trusted import foreign_run_config

from . import foreign_corpus as corpus
from .conftest import ROOT, TINY


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Iterator[corpus.Sandbox]:
    box = corpus.Sandbox.create(tmp_path)
    monkeypatch.setenv(corpus.MARKER_ENV, str(box.marker))
    yield box
    box.assert_untouched()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------------- writers (safe_files)
def test_checkpoint_into_a_planted_checkpoints_link_is_refused(sandbox):
    run = sandbox.root / "run"
    sandbox.link_out(run / "checkpoints", target_name="")
    with pytest.raises(safe_files.UnsafePathError, match=r"run/checkpoints: is a symlink"):
        save_checkpoint({"model": {"w": torch.ones(1)}}, run / "checkpoints" / "last.pt")


def test_checkpoint_over_a_planted_file_link_is_refused(sandbox):
    target = sandbox.link_out(sandbox.root / "run" / "checkpoints" / "last.pt")
    with pytest.raises(safe_files.UnsafePathError, match=r"last\.pt: is a symlink"):
        save_checkpoint({"model": {"w": torch.ones(1)}}, target)


def test_keeping_the_previous_checkpoint_never_writes_through_its_link(sandbox):
    checkpoints = sandbox.root / "run" / "checkpoints"
    sandbox.link_out(checkpoints / "last.prev.pt")
    save_checkpoint({"model": {"w": torch.ones(1)}}, checkpoints / "last.pt", keep_previous=True)
    save_checkpoint({"model": {"w": torch.zeros(1)}}, checkpoints / "last.pt", keep_previous=True)
    assert torch.equal(load_checkpoint(checkpoints / "last.prev.pt")["model"]["w"], torch.ones(1))


def test_safetensors_config_over_a_planted_link_is_refused(sandbox):
    from segkit.data.geometry import TrainingGeometry
    from segkit.runs.checkpoint import PT, CheckpointRecord, save_safetensors

    record = CheckpointRecord(sandbox.root / "best.pt", PT, OmegaConf.create({"model": {}}), TrainingGeometry((8, 8)),
                              temperature=1.0, class_names=(), privacy=None, weights={}, stored={})
    sandbox.link_out(sandbox.root / "best.yaml")
    with pytest.raises(safe_files.UnsafePathError, match=r"best\.yaml: is a symlink"):
        save_safetensors(torch.nn.Linear(1, 1), record, sandbox.root / "best.safetensors")


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_the_run_lock_is_never_opened_through_a_link_or_a_fifo(sandbox, kind):
    lock = sandbox.root / "run" / "run.lock"
    if kind == "symlink":
        sandbox.link_out(lock)
    else:
        lock.parent.mkdir(parents=True)
        os.mkfifo(lock)
    with pytest.raises(safe_files.UnsafePathError, match=r"run\.lock: is (a symlink|not a regular file)"):
        RunLock().acquire(lock.parent, "training")


def test_train_log_through_a_planted_link_ends_training_with_one_line(sandbox):
    """Hydra opens train.log while it sets logging up, before segkit's code: the refusal is still one line."""
    run = sandbox.root / "run"
    sandbox.link_out(run / "train.log")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run}"],
                            capture_output=True, text=True, timeout=300, cwd=sandbox.root)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert re.match(r"^error: .*train\.log: is a symlink", lines[0])
    assert not (run / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("name", ["epochs.csv", "benchmark.md"])
def test_appended_records_never_follow_a_link(sandbox, name):
    path = sandbox.link_out(sandbox.root / "run" / name)
    with pytest.raises(safe_files.UnsafePathError, match="is a symlink"):
        safe_files.open_append(path)


def test_a_write_leaves_no_predictable_temporary_and_survives_a_planted_one(sandbox):
    target = sandbox.root / "metrics.json"
    sandbox.link_out(sandbox.root / ".metrics.json.tmp")  # the old fixed temporary name, planted
    safe_files.write_text(target, "{}")
    assert target.read_text() == "{}" and not target.is_symlink()
    assert sorted(p.name for p in sandbox.root.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("aged", [False, True], ids=["young", "aged"])
def test_two_writers_of_one_file_both_land_and_leave_no_temporary(tmp_path, aged):
    """Two search workers write the sweep's multirun.yaml at once: neither removes the other's temporary, whether
    the first writer's is young or has been open long (then its lock is what keeps it)."""
    target = tmp_path / "multirun.yaml"
    with safe_files.atomic_write(target, "w") as first:
        first.write("first")
        (live,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if aged:
            os.utime(live, (time.time() - 3600,) * 2)
        safe_files.write_text(target, "second")
        assert live.exists()
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["multirun.yaml"]


def test_an_abandoned_temporary_is_removed_by_the_next_write_and_a_young_one_is_not(tmp_path):
    abandoned, young = tmp_path / ".out.txt.0a0a0a0a0a0a.tmp", tmp_path / ".out.txt.0b0b0b0b0b0b.tmp"
    abandoned.write_text("left by a killed writer")
    young.write_text("perhaps a writer that has not locked it yet")
    os.utime(abandoned, (time.time() - 3600,) * 2)
    safe_files.write_text(tmp_path / "out.txt", "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name, "out.txt"]


def test_a_directory_the_user_named_may_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "mine").symlink_to(tmp_path / "real")
    safe_files.write_text(tmp_path / "mine" / "out.txt", "ok")
    assert (tmp_path / "real" / "out.txt").read_text() == "ok"


# ---------------------------------------------------------------------- segkit-reproduce
@pytest.fixture
def saved_config(compose_cfg) -> dict:
    """A run's `.hydra/config.yaml` as Hydra saves it (unresolved), as plain data to edit."""
    return cast(dict, OmegaConf.to_container(compose_cfg()))


def refused_run(sandbox, capsys, text: str, *words: str, overrides: tuple[str, ...] = ()) -> str:
    run = corpus.run_dir(sandbox.root, text)
    out = sandbox.root.parent / "again"
    assert reproduce_cli.main([str(run), *overrides, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert str(run / ".hydra" / "config.yaml") in line
    for word in words:
        assert word in line, line
    assert not out.exists()
    return line


HYDRA_NODES = {
    "callbacks": {"callbacks": {"x": {"_target_": corpus.GADGET}}},
    "job_logging": {"job_logging": {"version": 1, "handlers": {"x": {"()": corpus.GADGET}},
                                    "root": {"handlers": ["x"]}}},
    "launcher": {"launcher": {"_target_": corpus.GADGET}},
    "sweeper": {"sweeper": {"_target_": corpus.GADGET}},
}


@pytest.mark.parametrize("node", HYDRA_NODES)
def test_reproduce_refuses_hydra_internals(sandbox, capsys, saved_config, node):
    saved_config["hydra"] = HYDRA_NODES[node]
    refused_run(sandbox, capsys, OmegaConf.to_yaml(saved_config), "hydra")


def test_reproduce_refuses_a_package_header(sandbox, capsys, saved_config):
    text = "# @package _global_\n" + OmegaConf.to_yaml({"hydra": HYDRA_NODES["callbacks"]})
    refused_run(sandbox, capsys, text, "@package")


def test_reproduce_refuses_a_package_header_that_moves_the_keys_into_hydra(sandbox, capsys, saved_config):
    text = "# @package hydra.callbacks\n" + OmegaConf.to_yaml(saved_config)
    refused_run(sandbox, capsys, text, "@package")


def test_reproduce_never_resolves_the_environment(sandbox, capsys, saved_config, monkeypatch):
    monkeypatch.setenv("SEGKIT_TEST_SECRET", "s3cret")
    saved_config["dataset"]["root"] = "${oc.env:SEGKIT_TEST_SECRET}"
    line = refused_run(sandbox, capsys, OmegaConf.to_yaml(saved_config), "dataset.root", "oc.env")
    assert "s3cret" not in line


@pytest.mark.parametrize("resolver", ["oc.decode", "oc.create", "now", "hydra", "oc.select"])
def test_reproduce_refuses_every_resolver(sandbox, capsys, saved_config, resolver):
    saved_config["task_name"] = f"${{{resolver}:x}}"
    refused_run(sandbox, capsys, OmegaConf.to_yaml(saved_config), "task_name", resolver)


def test_reproduce_refuses_an_unknown_key(sandbox, capsys, saved_config):
    saved_config["surprise"] = {"_target_": "segkit.models.build_model"}
    refused_run(sandbox, capsys, OmegaConf.to_yaml(saved_config), "surprise")


def test_reproduce_refuses_a_gadget_target(sandbox, capsys, saved_config):
    saved_config["loss"] = {"_target_": corpus.GADGET}
    refused_run(sandbox, capsys, OmegaConf.to_yaml(saved_config), "loss._target_", corpus.GADGET)


def test_reproduce_refuses_a_python_tag(sandbox, capsys, saved_config):
    text = OmegaConf.to_yaml(saved_config) + f"task_name: !!python/object/apply:{corpus.GADGET} []\n"
    refused_run(sandbox, capsys, text, "YAML tag 'tag:yaml.org,2002:python/object/apply")


def test_reproduce_refuses_an_alias_bomb(sandbox, capsys):
    refused_run(sandbox, capsys, corpus.alias_bomb(), "alias")


def test_reproduce_refuses_deep_nesting(sandbox, capsys):
    refused_run(sandbox, capsys, corpus.nested(200), "nested")


def test_reproduce_refuses_a_huge_config(sandbox, capsys):
    refused_run(sandbox, capsys, "task_name: " + "x" * (2 << 20) + "\n", "bytes")


@pytest.mark.parametrize(("key", "value"), [("trainer.batch_size", 10**9), ("dataset.image_size", [10**5, 10**5]),
                                            ("dataset.num_classes", 10**8), ("trainer.max_epochs", 10**12)])
def test_reproduce_refuses_sizes_beyond_the_limits_but_not_the_users_own(sandbox, capsys, saved_config, key, value):
    OmegaConf.update(cfg := OmegaConf.create(saved_config), key, value)
    text = OmegaConf.to_yaml(cfg)
    refused_run(sandbox, capsys, text, key, "command line")
    user_value = str(value).replace(" ", "")
    checked = foreign_run_config(sandbox.root / "run" / ".hydra" / "config.yaml", [f"{key}={user_value}"])
    assert OmegaConf.select(checked, key) == value


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_reproduce_reads_only_a_regular_config_file(sandbox, capsys, kind):
    run = sandbox.root / "run"
    (run / ".hydra").mkdir(parents=True)
    if kind == "symlink":
        sandbox.link_out(run / ".hydra" / "config.yaml")
    else:
        os.mkfifo(run / ".hydra" / "config.yaml")
    assert reproduce_cli.main([str(run), "--out", str(sandbox.root.parent / "again")]) == 2
    assert "config.yaml" in one_error_line(capsys)


def test_reproduce_takes_output_paths_from_the_user_not_the_file(sandbox, saved_config):
    saved_config["output_root"] = "their_place"
    saved_config["trainer"]["resume"] = str(sandbox.sentinel)
    saved_config["dataset"]["cache_dir"] = "their_cache"
    path = corpus.run_dir(sandbox.root, OmegaConf.to_yaml(saved_config)) / ".hydra" / "config.yaml"
    cfg = foreign_run_config(path)
    assert (cfg.output_root, cfg.trainer.resume, cfg.dataset.get("cache_dir")) == ("outputs", None, None)
    assert foreign_run_config(path, ["output_root=mine"]).output_root == "mine"
    assert sandbox.root not in default_out(sandbox.root / "run").absolute().parents


def test_reproduce_refuses_an_absolute_output_root_from_the_file(sandbox, capsys, saved_config):
    saved_config["output_root"] = str(sandbox.outside)
    refused_run(sandbox, capsys, OmegaConf.to_yaml(saved_config), "output_root")


def test_reproduce_into_an_output_with_a_planted_link_is_refused(sandbox, capsys, saved_config):
    run = corpus.run_dir(sandbox.root, OmegaConf.to_yaml(saved_config))
    out = sandbox.root / "again"
    sandbox.link_out(out / ".hydra", target_name="")
    assert reproduce_cli.main([str(run), "--out", str(out)]) == 2
    assert ".hydra: is a symlink" in one_error_line(capsys)


# ---------------------------------------------------------------------- a shared Optuna study
optuna = pytest.importorskip("optuna")


@pytest.fixture
def search(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from segkit.search import Search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweeper = OmegaConf.create({"n_trials": 4, "n_jobs": 1, "max_retries": 1})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    (tmp_path / "sweep").mkdir()
    space = {"optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
             "model": CategoricalDistribution(["unet", "fpn"]),
             "trainer.batch_size": IntDistribution(2, 8, step=2),
             "trainer.deterministic": CategoricalDistribution([True, False])}
    return Search(sweeper, config, launcher=None, parse=cast(Any, None)), space  # these cases never parse


@pytest.mark.parametrize(("params", "named"), [
    ({"hydra.callbacks.x._target_": corpus.GADGET}, "'hydra.callbacks.x._target_' is not in the declared"),
    ({"+hydra.job.env_set.X": "1"}, "is not in the declared"),
    ({"optimizer.lr": 5.0}, "optimizer.lr=5.0 is outside"),
    ({"model": "unet,fpn"}, "model='unet,fpn' is outside"),
    ({"trainer.batch_size": 5}, "trainer.batch_size=5 is outside"),
    ({"trainer.deterministic": 1}, "trainer.deterministic=1 is outside"),
])
def test_an_enqueued_trial_outside_the_space_is_refused_naming_it(search, params, named):
    from segkit.search import ForeignTrialError

    runner, space = search
    study = optuna.create_study(study_name="shared")
    study.enqueue_trial(params, skip_if_exists=False)
    with pytest.raises(ForeignTrialError, match=r"^study 'shared': trial 0: ") as refused:
        runner.ask(study, space)
    assert named in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_stored_waiting_trial_outside_the_space_is_refused(search):
    from optuna.distributions import CategoricalDistribution

    from segkit.search import ForeignTrialError

    runner, space = search
    study = optuna.create_study(study_name="shared")
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params={"loss": "evil"},
                                        distributions={"loss": CategoricalDistribution(["evil"])}))
    with pytest.raises(ForeignTrialError, match="trial 0: parameter 'loss'"):
        runner.ask(study, space)


def test_a_trial_inside_the_space_still_runs(search):
    runner, space = search
    study = optuna.create_study(study_name="shared")
    study.enqueue_trial({"optimizer.lr": 1e-3, "model": "fpn"})
    (trial,) = runner.ask(study, space)
    assert trial.params["optimizer.lr"] == 1e-3 and trial.params["model"] == "fpn"


def test_a_retry_history_naming_a_path_is_not_a_resume_source(search, sandbox):
    runner, space = search
    study = optuna.create_study(study_name="shared")
    study.enqueue_trial({"model": "fpn"})
    (trial,) = runner.ask(study, space)
    study._storage.set_trial_system_attr(trial._trial_id, "retry_history", [str(sandbox.outside / "..")])
    assert runner.resume_overrides(trial) == []


# ---------------------------------------------------------------------- segkit-report
def sweep_with_job(sandbox, metrics: str = '{"status": "FINISHED", "best": {"miou": 0.5}}') -> Path:
    job = sandbox.root / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("task_name: x\n")
    (job / ".hydra" / "overrides.yaml").write_text("- model=unet\n")
    (job / "metrics.json").write_text(metrics)
    return job.parent


@pytest.mark.parametrize("name", ["leaderboard.md", "leaderboard.csv", "leaderboard_heatmap.png"])
def test_report_never_writes_through_a_planted_leaderboard_link(sandbox, capsys, name):
    sweep = sweep_with_job(sandbox)
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text("hydra: {runtime: {choices: {model: unet, loss: ce}}}\n")
    sandbox.link_out(sweep / name)
    assert report.main([str(sweep)]) == 2
    assert f"{name}: is a symlink" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge"])
def test_report_reads_only_regular_small_run_records(sandbox, capsys, kind):
    sweep = sweep_with_job(sandbox)
    metrics = sweep / "0" / "metrics.json"
    metrics.unlink()
    if kind == "symlink":
        (sandbox.outside / "secret.json").write_text('{"status": "s3cret"}')
        metrics.symlink_to(sandbox.outside / "secret.json")
    elif kind == "fifo":
        os.mkfifo(metrics)
    else:
        metrics.write_text(" " * (17 << 20) + "{}")
    assert report.main([str(sweep), "--out", str(sandbox.root / "report")]) == 2
    line = one_error_line(capsys)
    assert "metrics.json" in line and "s3cret" not in line
    (sandbox.outside / "secret.json").unlink(missing_ok=True)


@pytest.mark.parametrize("text", [corpus.alias_bomb(), f"- !!python/object/apply:{corpus.GADGET} []\n"])
def test_report_refuses_aliases_and_tags_in_a_jobs_yaml(sandbox, capsys, text):
    sweep = sweep_with_job(sandbox)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text(text)
    assert report.main([str(sweep), "--out", str(sandbox.root / "report")]) == 2
    assert "overrides.yaml" in one_error_line(capsys)


def test_report_escapes_names_from_files(sandbox, capsys):
    sweep = sweep_with_job(sandbox, '{"status": "FINISHED<img src=x onerror=alert(1)>", "best": {"miou": 0.5, '
                                    '"per_class_iou": {"=HYPERLINK(\\"http://x\\")": 0.5, "$\\\\frac{": 0.1}}}')
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- 'model=[a](http://x)`|`'\n- loss=@SUM(1)\n")
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text("hydra: {runtime: {choices: {model: '$\\\\frac{', "
                                                      "loss: '@SUM(1)$x^{'}}}\n")
    out = sandbox.root / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    text = (out / "leaderboard.md").read_text()
    assert "`` model=[a](http://x)`\\|` ``" in text  # an override: inert inside a code span that holds its backticks
    prose = re.sub(r"(`+) .*? \1|(`+)[^`]*?\2", "", text)
    assert "\\<img" in prose and not re.search(r"(?<!\\)[<>]", prose)  # every angle bracket escaped: no raw HTML
    assert not re.search(r"(?<!\\)\]\(", prose) and not re.search(r"(?<!\\)\$", prose)  # no link; no math
    cells = (out / "leaderboard.csv").read_text()
    assert "'@SUM(1)$x^{" in cells and "'model=" not in cells  # only a cell that starts like a formula
    assert all(not cell.startswith(("=", "+", "@")) for line in cells.splitlines() for cell in line.split(","))
    assert (out / "leaderboard_heatmap.png").stat().st_size > 1000  # `$\frac{` drawn as text, not mathtext


class CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        CountingHandler.requests.append(f"{self.path} {self.headers.get('Authorization')}")
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_report_from_a_foreign_mlflow_store_contacts_no_server(sandbox, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    server = http.server.HTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "users-token")
    try:
        uri = f"sqlite:///{sandbox.root / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment(
            "shared", artifact_location=f"http://127.0.0.1:{server.server_port}/artifacts")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "val/miou", 0.5)
        client.set_terminated(run.info.run_id)
        assert report.main(["--experiment", "shared", "--tracking-uri", uri, "--out", str(sandbox.root / "r")]) == 0
    finally:
        server.shutdown()
    assert CountingHandler.requests == []
    assert "is not a local path under the store" in capsys.readouterr().err
    assert "0.5000" in (sandbox.root / "r" / "leaderboard.md").read_text()


# ---------------------------------------------------------------------- load, predict, evaluate, check-data
def test_load_refuses_compressed_records_before_inflating_them(sandbox):
    path = corpus.compressed_checkpoint(sandbox.root / "bomb.pt", inflated_bytes=64 << 20)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"bomb\.pt: record 'archive/data/1' is compressed"):
        load_checkpoint(path)


def test_load_refuses_the_legacy_format(sandbox):
    path = sandbox.root / "legacy.pt"
    torch.save({"model": {"w": torch.ones(1)}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: .*not a zip archive"):
        load_checkpoint(path)


def test_segkit_load_refuses_a_compressed_checkpoint_in_one_line(sandbox):
    import segkit

    path = corpus.compressed_checkpoint(sandbox.root / "shared.pt", inflated_bytes=8 << 20)
    with pytest.raises(CheckpointError) as refused:
        segkit.load(path, device="cpu")
    assert len(str(refused.value).splitlines()) == 1 and "shared.pt" in str(refused.value)


@pytest.mark.parametrize(("config", "named"), [
    (corpus.alias_bomb(), "a YAML alias refused"),
    (corpus.nested(100), "nested more than"),
    (f"model: !!python/object/apply:{corpus.GADGET} []\n", "YAML tag"),
    ("model: " + "x" * (2 << 20) + "\n", "characters, more than"),
])
@pytest.mark.parametrize("trust", [False, True])
def test_a_checkpoints_stored_config_is_checked_before_it_is_parsed(sandbox, config, named, trust):
    import segkit

    path = sandbox.root / "shared.pt"
    save_checkpoint({"model": {}, "config": config}, path)
    with pytest.raises(CheckpointError, match=rf"shared\.pt: stored config.*{named}"):
        segkit.load(path, device="cpu", trust=trust)  # limits hold with trust too


@pytest.mark.parametrize("reader", ["read_image", "read_mask", "read_color_mask"])
def test_an_image_header_declaring_huge_dimensions_is_refused_before_decoding(sandbox, reader):
    from segkit.data import io

    path = corpus.png_header(sandbox.root / "bomb.png", 100_000, 100_000, mode=2 if reader == "read_image" else 0)
    call = getattr(io, reader)
    args = (path, io.ColorTable([[0, 0, 0], [255, 255, 255]], 255)) if reader == "read_color_mask" else (path,)
    with pytest.raises(DataError, match=r"bomb\.png: header declares 100000x100000 pixels.*SEGKIT_MAX_IMAGE_PIXELS"):
        call(*args)


def test_the_pixel_limit_is_raised_by_its_key(sandbox, monkeypatch):
    from segkit.data import io

    path = corpus.png_header(sandbox.root / "wide.png", 4000, 10)
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "1000")
    with pytest.raises(DataError, match="SEGKIT_MAX_IMAGE_PIXELS"):
        io.check_pixels(path)
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "100000")
    io.check_pixels(path)


def test_check_data_reports_a_bomb_mask_as_one_problem(sandbox, compose_cfg):
    from PIL import Image

    from segkit.tools.checks import check_split

    root = sandbox.root / "data"
    for split in ("train",):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "images" / split / "a.png")
        corpus.png_header(root / "masks" / split / "a.png", 100_000, 100_000, mode=0)
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=2", "dataset.image_size=[8,8]"],
                      tiny=False).dataset
    problems = check_split(cfg, "train").problems
    assert any("header declares 100000x100000" in p for p in problems), problems


def test_evaluate_and_predict_refuse_an_output_directory_holding_a_link(sandbox):
    safe_files.refuse_links(sandbox.root)  # a plain directory passes
    sandbox.link_out(sandbox.root / "report" / "report.html")
    with pytest.raises(safe_files.UnsafePathError, match=r"report\.html: is a symlink"):
        safe_files.refuse_links(sandbox.root)


def test_export_never_writes_through_a_planted_onnx_link(sandbox):
    pytest.importorskip("onnx")
    from segkit.inference.export import export_onnx

    target = sandbox.link_out(sandbox.root / "best.onnx")
    with pytest.raises(SegkitError, match=r"best\.onnx: is a symlink"):
        export_onnx(torch.nn.Conv2d(3, 2, 1), target, (8, 8))


def test_plots_draw_class_names_as_plain_text(sandbox):
    from segkit.reporting.plots import save_confusion, save_iou_bars

    names = ["$\\frac{", "a_b^c$", "$$", "\\mathbf{x}"]
    save_iou_bars(dict.fromkeys(names, 0.5), sandbox.root / "iou.png")
    save_confusion([[1, 0, 0, 0]] * 4, names, sandbox.root / "confusion.png")
    assert (sandbox.root / "iou.png").stat().st_size > 1000


def test_the_html_report_escapes_names(sandbox):
    import numpy as np
    from PIL import Image

    from segkit.reporting.browsing import ImageRow
    from segkit.reporting.html import write_report

    name, filename = "<script>alert(1)</script>", "<img src=x onerror=alert(1)>.png"
    summary = {"per_class_iou": {name: 0.5}, "per_class_dice": {name: 0.5}, "confusion_matrix": [[1]],
               "miou": 0.5, "mdice": 0.5, "pixel_acc": 0.5}
    figure = sandbox.root / "r" / "images" / "figure_00000_x.png"
    figure.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(figure)
    page = write_report(sandbox.root / "r", summary=summary, class_names=[name], palette=np.zeros((1, 3)),
                        meta={"checkpoint": name}, charts={}, images=[ImageRow(filename, 0.5, 0.5, [0.5], figure)],
                        worst_per_class={name: [0]}).read_text()
    assert name not in page and filename not in page and "&lt;script&gt;" in page and "&lt;img src=x" in page
    assert "<script>" not in page  # the page's own scripts are files beside it: <script src=...>
    data = (sandbox.root / "r" / "data.js").read_text()  # the same names as JavaScript string escapes
    assert "<" not in data and ">" not in data and "\\u003cimg src=x onerror=alert(1)\\u003e.png" in data


# ---------------------------------------------------------------------- resume, evaluate, predict end to end
@pytest.fixture
def tiny_checkpoint(compose_cfg, sandbox) -> Path:
    """A checkpoint as training leaves it in a (foreign) run directory: <run>/checkpoints/best.pt."""
    from segkit.config import build

    cfg = compose_cfg(["model=unet"])
    net = build(cfg.model, "model")
    path = sandbox.root / "run" / "checkpoints" / "best.pt"
    save_checkpoint({"model": net.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, path)
    return path


def test_resume_into_a_run_with_a_planted_config_link_writes_nothing_through_it(sandbox, compose_cfg):
    from segkit.engine.trainer import fit

    run = sandbox.root / "run"
    sandbox.link_out(run / "config.yaml")
    with pytest.raises(safe_files.UnsafePathError, match=r"run/config\.yaml: is a symlink"):
        fit(compose_cfg(["trainer.resume=auto"]), run)


def test_evaluate_refuses_a_planted_link_in_its_default_output_directory(sandbox, tiny_checkpoint, capsys):
    from hydra import compose, initialize_config_dir

    from segkit.cli import evaluate as evaluate_cli
    from segkit.cli.common import run_or_exit

    from .conftest import CONF_DIR

    sandbox.link_out(sandbox.root / "run" / "eval", target_name="")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"checkpoint={tiny_checkpoint}", "progress_bar=false",
                                                         "report=false", "save_masks=false", "device=cpu"])
    with pytest.raises(SystemExit) as exited:
        run_or_exit(lambda: evaluate_cli.run(cfg))
    assert exited.value.code == 2
    assert "run/eval: is a symlink" in one_error_line(capsys)


def test_predict_refuses_an_output_directory_holding_a_planted_link(sandbox, tiny_checkpoint, capsys):
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from segkit.cli import predict as predict_cli
    from segkit.cli.common import run_or_exit

    from .conftest import CONF_DIR

    images = sandbox.root / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "photo.png")
    out = sandbox.root / "out"
    sandbox.link_out(out / "photo.png")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=[f"checkpoint={tiny_checkpoint}", f"input={images}",
                                                        f"output={out}", "progress_bar=false", "device=cpu"])
    with pytest.raises(SystemExit) as exited:
        run_or_exit(lambda: predict_cli.run(cfg))
    assert exited.value.code == 2
    assert "out/photo.png: is a symlink" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["calibrate", "export", "evaluate", "predict"])
def test_every_command_refuses_a_checkpoint_bomb_in_one_line(sandbox, capsys, command):
    import importlib

    from hydra import compose, initialize_config_dir

    from segkit.cli.common import run_or_exit

    from .conftest import CONF_DIR

    bomb = corpus.compressed_checkpoint(sandbox.root / "shared.pt", inflated_bytes=8 << 20)
    corpus.png_header(sandbox.root / "photo.png", 8, 8)
    extra = {"predict": [f"input={sandbox.root}", f"output={sandbox.root / 'out'}"],
             "export": ["benchmark=false"]}.get(command, [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=command, overrides=[f"checkpoint={bomb}", *extra])
    with pytest.raises(SystemExit) as exited:
        run_or_exit(lambda: importlib.import_module(f"segkit.cli.{command}").run(cfg))
    assert exited.value.code == 2
    assert "shared.pt: record 'archive/data/1' is compressed" in one_error_line(capsys)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_library_never_starts_in_a_folder_holding_a_planted_link(sandbox, tracker):
    """TensorBoard and W&B write their own files: their folder is checked for links before they start."""
    pytest.importorskip(tracker if tracker == "wandb" else "tensorboard")
    from segkit.trackers.tensorboard import TensorBoardTracker
    from segkit.trackers.wandb import WandbTracker

    run = sandbox.root / "run"
    sandbox.link_out(run / tracker / "events.out.tfevents.planted")
    chosen = TensorBoardTracker() if tracker == "tensorboard" else WandbTracker(mode="offline")
    with pytest.raises(safe_files.UnsafePathError, match=r"events\.out\.tfevents\.planted: is a symlink"):
        chosen.start(run, {}, {})


BOUNDED = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_DATA, (BYTES, BYTES))  # heap and private mappings: torch itself needs ~1 GB
import segkit
from segkit.data.io import read_image
from segkit.errors import SegkitError
for name, load in [("archive", lambda: segkit.load(sys.argv[1], device="cpu")),
                   ("image", lambda: read_image(Path(sys.argv[2]))),
                   ("config", lambda: segkit.load(sys.argv[3], device="cpu"))]:
    try:
        load()
        print(name, "LOADED")
    except SegkitError as error:
        print(name, "refused:", str(error).splitlines()[0])
    except MemoryError:
        print(name, "MemoryError")
# VmHWM, this program's own peak resident memory (ru_maxrss would also count the forking parent's, which
# Linux carries across exec)
peak_kib = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak", int(peak_kib) * 1024)
"""


def test_bombs_are_refused_inside_a_memory_limit_they_would_exceed(sandbox):
    """Each bomb would need more than the process may allocate: a compressed record inflating to 2 GiB, a PNG
    header of 10^10 pixels (30 GB decoded), a stored config whose aliases expand 9^12-fold. Under a 1.5 GiB
    data limit each one is refused in one line, and the process stays below the limit."""
    limit = 3 << 29  # 1.5 GiB
    archive = corpus.compressed_checkpoint(sandbox.root / "archive.pt", inflated_bytes=2 << 30)
    image = corpus.png_header(sandbox.root / "huge.png", 100_000, 100_000)
    config = sandbox.root / "config.pt"
    save_checkpoint({"model": {}, "config": corpus.alias_bomb()}, config)
    result = subprocess.run([sys.executable, "-c", BOUNDED.replace("BYTES", str(limit)), str(archive), str(image),
                             str(config)], capture_output=True, text=True, timeout=300, cwd=sandbox.root)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert result.returncode == 0, result.stderr[-2000:]
    assert lines["archive"].startswith("refused: ") and "compressed" in lines["archive"]
    assert lines["image"].startswith("refused: ") and "100000x100000" in lines["image"]
    assert lines["config"].startswith("refused: ") and "alias" in lines["config"]
    assert int(lines["peak"]) < limit


@pytest.mark.parametrize("kind", ["fifo", "symlink", "deep"])
def test_a_foreign_run_summary_that_is_not_a_plain_record_is_not_read(sandbox, kind):
    """metrics.json beside a foreign checkpoint (class names), in a sweep job or an MLflow artifact folder:
    a fifo would block the reader, a link would read another file, a deep nest would crash json.loads."""
    from segkit.runs.run_dir import RunDir, read_summary

    run = RunDir(sandbox.root / "run")
    run.path.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(run.metrics)
    elif kind == "symlink":
        sandbox.link_out(run.metrics)
    else:
        run.metrics.write_text('{"class_names": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert read_summary(run.metrics) is None and run.read_metrics() is None
