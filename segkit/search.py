"""Hyperparameter search on current Optuna behind Hydra's `-m` grammar: persistent, resumable, shared.

    python train.py -m hparams_search=optuna hydra.sweeper.n_trials=30

Two halves, joined by the study's storage (sqlite next to the MLflow store by default, any SQLAlchemy
URL by `hydra.sweeper.storage`):

- the sweeper side (`Search`, driven by the thin Hydra plugin in hydra_plugins/segkit_search/): asks the
  study for trials and hands each to Hydra's launcher as a job whose directory is `<sweep dir>/<trial
  number>`. It keeps a heartbeat for the trials it launched and, before asking, gives interrupted trials
  (their worker died, or stopped beating) a retry with the same parameters that resumes from the
  interrupted trial's last checkpoint. `n_trials` is the study's total, so the same command resumes a
  killed search and several workers (processes, SLURM array jobs) share one study.
- the job side (`run_trial`, called by train.py): trains with a per-validation hook that reports
  `trainer.monitor` to the trial and stops it when the pruner says so, measures the extra objectives
  (inference latency on the run's device, parameter count), tells the study the outcome, writes
  `trial.json` into the job directory and tags the job's MLflow run with the trial number and state.

Optuna's ask-and-tell API has no public accessor for a trial's storage id, which a second process needs
to report to a trial it did not ask for; `study._storage`, `trial._trial_id` and `study._study_id` are
used for that (and for the heartbeat) and nothing else.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from segkit import safe_files
from segkit.errors import SegkitError
from segkit.runs.run_dir import LAST, RunDir
from segkit.sweeps import TRIAL_FILE, error_message

log = logging.getLogger("segkit")

TRIAL_ENV = "SEGKIT_OPTUNA_TRIAL"  # set in each job (hydra.job.env_set): the trial number it runs
STUDY_FILE = "study.json"
# name -> (direction, what it measures); the first objective is what pruning watches.
Direction = Literal["minimize", "maximize"]
OBJECTIVES: dict[str, tuple[Direction, str]] = {
    "miou": ("maximize", "best trainer.monitor (val/miou by default; minimised for a `min` monitor)"),
    "latency_ms": ("minimize", "inference latency of one image at the training size on the run's device"),
    "params": ("minimize", "parameter count"),
}


@dataclass
class SearchConf:
    """hydra.sweeper for `hparams_search=optuna*` (conf/hparams_search/, conf/hydra/sweeper/)."""

    _target_: str = "hydra_plugins.segkit_search.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # sampler and pruner stay configs: the search instantiates them itself
    # _self_ first: the chosen sampler and pruner fill the `None`s below
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    study_name: str = "train"
    storage: str | None = None  # null: sqlite:///<abs output_root>/optuna.db
    objectives: list[str] = field(default_factory=lambda: ["miou"])  # keys of OBJECTIVES
    n_trials: int = 20  # trials of the whole study (complete, pruned, failed, running), over all workers
    n_jobs: int = 1  # trials handed to the launcher at once (joblib / submitit run them in parallel)
    heartbeat_interval: int = 60  # seconds; a trial that misses heartbeats for grace_period is retried
    grace_period: int = 180
    max_retries: int = 3  # how often one interrupted trial is run again
    sampler: Any = None
    pruner: Any = None
    params: dict[str, str] = field(default_factory=dict)  # key: Hydra sweep, e.g. tag(log, interval(1e-4, 1e-2))


ConfigStore.instance().store(group="hydra/sweeper", name="segkit_optuna", node=SearchConf, provider="segkit")


# ---------------------------------------------------------------------- the study
def storage_url(sweeper: DictConfig | SearchConf, output_root: str | Path) -> str:
    if sweeper.storage:
        return str(sweeper.storage)
    root = Path(output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


def directions(objectives: Sequence[str], cfg: DictConfig) -> list[Direction]:
    """Optuna directions; `miou` (the best trainer.monitor) follows trainer.monitor_mode."""
    from segkit.config import monitor_mode

    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown or not objectives:
        from segkit.errors import ConfigError

        raise ConfigError("hydra.sweeper.objectives", f"{list(objectives)}: choose from {', '.join(OBJECTIVES)}")
    mode = monitor_mode(str(cfg.trainer.monitor), str(cfg.trainer.monitor_mode))
    score: Direction = "maximize" if mode == "max" else "minimize"
    return [score if name == "miou" else OBJECTIVES[name][0] for name in objectives]


def open_storage(url: str, sweeper: DictConfig | SearchConf, heartbeat: bool):
    import optuna

    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 60}  # several workers write one file: wait for its lock
    kwargs: dict[str, Any] = {}
    if heartbeat:  # the sweeper side: stale trials of dead workers are failed and retried
        kwargs = {"heartbeat_interval": int(sweeper.heartbeat_interval), "grace_period": int(sweeper.grace_period),
                  "heartbeat_stale_trial_callback": Retry(int(sweeper.max_retries))}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)


def open_study(sweeper: DictConfig, cfg: DictConfig, *, heartbeat: bool = False,
               sampler: Any = None) -> tuple[Any, bool]:
    """(the study, whether this call created it). Its pruner comes from the sweeper config."""
    import optuna
    from hydra.utils import instantiate

    url = storage_url(sweeper, cfg.output_root)
    storage = open_storage(url, sweeper, heartbeat)
    dirs = directions(list(sweeper.objectives), cfg)
    pruner = instantiate(sweeper.pruner) if sweeper.pruner is not None and len(dirs) == 1 else None
    try:
        study = optuna.create_study(storage=storage, study_name=sweeper.study_name, directions=dirs,
                                    sampler=sampler, pruner=pruner)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=sweeper.study_name, storage=storage, sampler=sampler, pruner=pruner)
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in dirs]:
            from segkit.errors import ConfigError

            raise ConfigError("hydra.sweeper.objectives", f"study {sweeper.study_name!r} in {url} optimises "
                              f"{len(study.directions)} objective(s) with other directions; pick another "
                              "hydra.sweeper.study_name") from None
        return study, False


class Retry:
    """Queue an interrupted trial again with its parameters (Optuna's RetryHeartbeatStaleTrialCallback
    records, so `RetryHeartbeatStaleTrialCallback.retried_trial_number` works), without its worker."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, study: Any, trial: Any) -> None:
        import optuna

        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > self.max_retries:
            log.warning("trial %d was interrupted %d times; not retried again", history[0], len(history))
            return
        study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            system_attrs={"failed_trial": history[0], "retry_history": history}))
        log.info("trial %d was interrupted; queued again with the same parameters", trial.number)


def counted_trials(trials: Sequence[Any]) -> tuple[int, int]:
    """(trials toward n_trials, waiting ones): every trial except the interrupted ones that were queued again."""
    import optuna

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return sum(t.number not in retried for t in trials), waiting


# ---------------------------------------------------------------------- the search space
def search_space(overrides: Sequence[Any]) -> tuple[dict[str, Any], list[str]]:
    """Hydra overrides -> ({key: Optuna distribution}, fixed `key=value` overrides for every trial).

    choice(a, b) -> categorical; interval(lo, hi) -> float (int when both ends are ints, e.g. int(interval(..)));
    range(start, stop, step) -> int/float with that step; tag(log, ...) -> log scale."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(f"{key}={override.get_value_element_as_str()}")
            continue
        sweep = override.value()
        log_scale = "log" in sweep.tags
        if isinstance(sweep, ChoiceSweep):
            values = [v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
                      for v in override.sweep_iterator()]
            space[key] = CategoricalDistribution(values)
        elif isinstance(sweep, IntervalSweep):
            assert sweep.start is not None and sweep.end is not None  # interval(start, end) sets both
            if isinstance(sweep.start, int) and isinstance(sweep.end, int):
                space[key] = IntDistribution(sweep.start, sweep.end, log=log_scale)
            else:
                space[key] = FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
        elif isinstance(sweep, RangeSweep):
            points: list[Any] = list(override.sweep_iterator())  # numbers: range() takes no others
            if all(isinstance(v, int) for v in points):
                space[key] = IntDistribution(points[0], points[-1], step=int(sweep.step))
            else:
                space[key] = FloatDistribution(points[0], points[-1], step=float(sweep.step))
        else:  # pragma: no cover - Hydra has no other sweep types
            raise ValueError(f"{override.input_line}: unsupported sweep")
    return space, fixed


class ForeignTrialError(SegkitError):
    """A trial in the study asks for parameters outside the search space this command declares."""


def outside_space(params: dict[str, Any], space: dict[str, Any]) -> str | None:
    """Why `params` do not fit `space` (a name it does not declare, a value outside its distribution), or None."""
    for name, value in params.items():
        distribution = space.get(name)
        if distribution is None:
            return f"parameter {name!r} is not in the declared search space ({', '.join(space) or 'empty'})"
        choices = getattr(distribution, "choices", None)
        if choices is not None:  # categorical: one of the declared values, of the same type (True is not 1)
            inside = any(type(value) is type(choice) and value == choice for choice in choices)
        else:
            try:
                inside = not isinstance(value, bool) and distribution._contains(distribution.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
        if not inside:
            return f"{name}={value!r} is outside its declared distribution {distribution}"
    return None


def check_trials(study: Any, trials: Sequence[Any], space: dict[str, Any]) -> None:
    """Refuse, naming the trial, any trial whose parameters the declared space does not hold: its names would
    become Hydra overrides of this run (hydra.callbacks..., any config key), its values anything."""
    for trial in trials:
        fixed = trial.system_attrs.get("fixed_params", {})  # study.enqueue_trial's parameters
        why = outside_space({**fixed, **trial.params}, space) if isinstance(fixed, dict) else \
            f"fixed_params {fixed!r} is not a mapping of parameters"
        if why is not None:
            raise ForeignTrialError(f"study {study.study_name!r}: trial {trial.number}: {why}; refused, nothing "
                                    "was launched. Delete that trial from the study or use another "
                                    "hydra.sweeper.study_name")


def as_override(key: str, value: Any) -> str:
    if isinstance(value, str) and any(c in value for c in " ,[]{}()=:'\""):
        return f"{key}={json.dumps(value)}"
    if value is None:
        return f"{key}=null"
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


# ---------------------------------------------------------------------- the sweeper side
class Search:
    """Ask, launch, repeat until the study holds n_trials (see the module docstring)."""

    def __init__(self, sweeper: DictConfig, config: DictConfig, launcher: Any, parse: Callable[[list[str]], list]):
        self.sweeper = sweeper
        self.config = config
        self.launcher = launcher
        self.parse = parse
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, arguments: list[str]) -> list[Any]:
        import optuna
        from hydra.utils import instantiate

        params = [f"{k}={v}" for k, v in (self.sweeper.params or {}).items()]
        space, fixed = search_space(self.parse([*params, *arguments]))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        safe_files.write_text(self.sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # Optuna beats only inside Study.optimize; this search beats for its own trials (_heartbeat).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        seed = self.sweeper.sampler.get("seed") if self.sweeper.sampler is not None else None
        with self.lock():
            study, created = open_study(self.sweeper, self.config, heartbeat=True)
        if not created and seed is not None:
            # A resumed search or a second worker: another random stream than the first worker's,
            # which would otherwise propose the same first trials again.
            seed = hash((seed, len(study.trials), self.worker)) % 2**31
        study.sampler = instantiate(self.sweeper.sampler, **({"seed": seed} if seed is not None else {}))
        url = storage_url(self.sweeper, self.config.output_root)
        shown = _without_password(url)
        log.info("study %r in %s (%s); watch it with: optuna-dashboard %s", study.study_name, shown,
                 "new" if created else f"{len(study.trials)} trials so far", shown)
        returns = []
        while batch := self.ask(study, space):
            returns.append(self.launch(study, batch, fixed))
        self.write_study_file(study, url)
        return returns

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Workers of this machine take turns counting and asking, so the study never overshoots n_trials."""
        with safe_files.open_lock(self.sweep_dir / "study.lock") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ask(self, study: Any, space: dict[str, Any]) -> list[Any]:
        import optuna

        with self.lock():
            self.recover_interrupted(study)
            check_trials(study, study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.WAITING]), space)
            counted, waiting = counted_trials(study.get_trials(deepcopy=False))
            room = max(0, int(self.sweeper.n_trials) - counted) + waiting  # queued retries run first
            batch = []
            for _ in range(min(int(self.sweeper.n_jobs), room)):
                trial = study.ask(space)
                if outside_space(trial.params, space) is not None:  # queued by another process meanwhile
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    check_trials(study, [trial], space)
                trial.set_user_attr("worker", self.worker)
                batch.append(trial)
        if not batch:
            log.info("study %r holds %d trials (n_trials=%d): nothing left to run here", study.study_name,
                     counted, self.sweeper.n_trials)
        return batch

    def recover_interrupted(self, study: Any) -> None:
        """Fail and retry RUNNING trials whose worker is gone: a dead process of this machine at once,
        any other worker once its heartbeat is older than grace_period."""
        import optuna

        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
            if worker_host == host and pid.isdigit() and not _alive(int(pid)):
                study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                Retry(int(self.sweeper.max_retries))(study, study._storage.get_trial(trial._trial_id))
        optuna.storages.fail_stale_trials(study)

    def launch(self, study: Any, batch: list[Any], fixed: list[str]) -> Any:
        import optuna
        from hydra.core.utils import JobStatus

        jobs = [[*fixed, *[as_override(k, v) for k, v in trial.params.items()], *self.resume_overrides(trial),
                 f"hydra.sweep.subdir={trial.number}", f"+hydra.job.env_set.{TRIAL_ENV}={trial.number}"]
                for trial in batch]
        storage = study._storage
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(storage, [t._trial_id for t in batch], stop,
                                                         int(self.sweeper.heartbeat_interval)), daemon=True)
        beat.start()
        try:
            results = self.launcher.launch(jobs, initial_job_idx=batch[0].number)
            for trial, result in zip(batch, results, strict=True):
                if result.status == JobStatus.FAILED:
                    log.error("trial %d: the job raised %s", trial.number, error_message(result._return_value))
            return results
        finally:
            # A trial the job did not close (killed, Ctrl-C, a crash outside the training) is queued again.
            stop.set()
            beat.join()
            for trial in batch:
                frozen = storage.get_trial(trial._trial_id)
                if frozen.state == optuna.trial.TrialState.RUNNING:
                    storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                    Retry(int(self.sweeper.max_retries))(study, storage.get_trial(trial._trial_id))

    def resume_overrides(self, trial: Any) -> list[str]:
        """A retried trial continues from the newest checkpoint its interrupted predecessors left."""
        history = trial.study._storage.get_trial(trial._trial_id).system_attrs.get("retry_history", [])
        for number in reversed(history):
            if not isinstance(number, int) or isinstance(number, bool):
                continue  # a trial number, never a path a stored attribute names
            checkpoint = RunDir(self.sweep_dir / str(number)).checkpoint(LAST)
            if checkpoint.is_file():
                return [as_override("trainer.resume", str(checkpoint.resolve()))]
        return []

    def write_study_file(self, study: Any, url: str) -> None:
        """study.json: where the study lives and its best trials (the Pareto front with several objectives)."""
        import optuna

        finished = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
        record = {
            "study_name": study.study_name, "storage": _without_password(url),
            "objectives": list(self.sweeper.objectives),
            "directions": directions(list(self.sweeper.objectives), self.config),
            "trials": {state.name: len(study.get_trials(deepcopy=False, states=[state]))
                       for state in optuna.trial.TrialState},
            "best_trials": [{"number": t.number, "values": t.values, "params": t.params}
                            for t in (study.best_trials if finished else [])],
        }
        safe_files.write_text(self.sweep_dir / STUDY_FILE, json.dumps(record, indent=2))
        for trial in record["best_trials"]:
            log.info("best trial %d: %s %s", trial["number"], dict(zip(self.sweeper.objectives, trial["values"],
                                                                       strict=True)), trial["params"])


def _heartbeat(storage: Any, trial_ids: list[int], stop: threading.Event, interval: int) -> None:
    while True:
        for trial_id in trial_ids:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # noqa: BLE001 - a missed beat only risks an early retry
                log.warning("optuna heartbeat failed (%s)", error)
        if stop.wait(interval):
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        credentials, _, host = rest.partition("@")
        return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
    return url


# ---------------------------------------------------------------------- the job side
def trial_number() -> int | None:
    """The trial this process runs (a job launched by the search), else None."""
    value = os.environ.get(TRIAL_ENV)
    return int(value) if value is not None else None


def run_trial(cfg: DictConfig, output_dir: str | Path, train: Callable[..., dict[str, Any] | None]) -> Any:
    """Train trial `trial_number()` with pruning, measure its objectives and tell the study.

    `train(on_validation)` runs the training (a failure already recorded, returning None)."""
    import optuna
    from hydra.core.hydra_config import HydraConfig

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sweeper = HydraConfig.get().sweeper
    objectives = list(sweeper.objectives)
    study, _ = open_study(sweeper, cfg)
    number = int(trial_number())  # type: ignore[arg-type]
    trial = optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id,
                                                                                              number))
    output_dir = Path(output_dir)
    trial.set_user_attr("run_dir", str(output_dir.resolve()))
    monitor = str(cfg.trainer.monitor)
    prunes = len(objectives) == 1 and sweeper.pruner is not None

    def report(epoch: int, record: dict[str, Any]) -> str | None:
        if not prunes or record.get(monitor) is None:
            return None
        trial.report(float(record[monitor]), epoch)
        return f"pruned by optuna at epoch {epoch}" if trial.should_prune() else None

    summary = train(report)
    outcome: dict[str, Any] = {"study_name": study.study_name, "number": number, "objectives": objectives,
                               "directions": directions(objectives, cfg), "params": trial.params,
                               "retry_of": study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")}
    stop_reason = str((summary or {}).get("stop_reason") or "")
    if stop_reason.startswith("SIG"):
        return summary  # Ctrl-C / SIGTERM: train.py exits, and the search queues the trial again
    if stop_reason.startswith("pruned"):
        outcome["state"] = "PRUNED"
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
    elif summary is None or summary.get("best_score") is None:  # failed (failed.json), or never validated
        outcome["state"] = "FAIL"
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    else:
        measured = measure_objectives(cfg, objectives, summary)
        for name, value in measured.items():
            trial.set_user_attr(name, value)
        outcome.update(state="COMPLETE", values=[measured[name] for name in objectives], **measured)
        study.tell(number, outcome["values"])
    safe_files.write_text(output_dir / TRIAL_FILE, json.dumps(outcome, indent=2))
    if (mlflow_node := (cfg.get("logger") or {}).get("mlflow")) is not None:
        from segkit.trackers.mlflow import tag_runs

        tag_runs(mlflow_node, output_dir, {"optuna.study": study.study_name, "optuna.trial": str(number),
                                           "optuna.state": outcome["state"]})
    log.info("trial %d: %s %s", number, outcome["state"], outcome.get("values", ""))
    return summary


def measure_objectives(cfg: DictConfig, objectives: Sequence[str], summary: dict[str, Any]) -> dict[str, float]:
    measured: dict[str, float] = {"miou": float(summary["best_score"])}
    if "latency_ms" in objectives or "params" in objectives:
        model, device = _inference_model(cfg)
        measured["params"] = float(sum(p.numel() for p in model.parameters()))
        if "latency_ms" in objectives:
            measured["latency_ms"] = inference_latency_ms(model, cfg, device)
    return measured


def _inference_model(cfg: DictConfig) -> tuple[Any, Any]:
    """The run's network in eval mode on its device (weights do not change the timing: none are loaded)."""
    from segkit.config import build
    from segkit.engine.step import resolve_device

    model_cfg = OmegaConf.create(cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True)))
    backbone = model_cfg.get("backbone")
    if isinstance(backbone, DictConfig) and "pretrained" in backbone:
        backbone.pretrained = False  # never download for a timing
    device = resolve_device(str(cfg.trainer.accelerator), "trainer.accelerator")
    return build(model_cfg, "model").to(device).eval(), device


def inference_latency_ms(model: Any, cfg: DictConfig, device: Any, windows: int = 5, steps: int = 10) -> float:
    """Median milliseconds per image through segkit's inference path (Predictor.logits at the training
    size, batch 1), timed by segkit.benchmark.interleave."""
    import torch

    from segkit.benchmark import interleave
    from segkit.inference.predictor import Predictor

    predictor = Predictor(model, cfg, device)
    image = torch.rand(1, 3, *predictor.image_size)

    @torch.no_grad()
    def step() -> int:
        predictor.logits(image)
        return 1

    timing = interleave({"latency": step}, device, windows=windows, steps=steps, settle=1, warmup=3)
    return 1000.0 / timing.median("latency")
