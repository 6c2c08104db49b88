"""The sweep command: an Optuna study over the search space in the config's `sweep:` section.

Each trial is an ordinary run, trained by the train recipe into its own run directory. Every
evaluation is reported to Optuna, whose median pruner stops a trial that trails the earlier ones
at the same step; the pruned run ends as an early-stopped one, complete. The study lives in a
SQLite file beside the trials, so the same command run again continues it up to --trials in all.

Several workers share one study in a database server (--storage postgresql://...): the same
command on several machines, or --workers N on one. Each worker asks the study for the next
trial, so each trial runs once, and sends Optuna a heartbeat while it trains; a worker silent for
two heartbeats (killed, its machine taken away) has its trial marked failed by whichever worker
asks next, and with --retry-failed K the trial is asked again with the same values and its run
resumed from its last checkpoint. Pruning compares trials across workers: the study holds them all.

    output_dir/<name>-sweep/
      study.db              the Optuna study (unless --storage names another)
      <name>-trial-<n>/     one run directory per trial
      trials.csv            one row per trial: number, state, score, values, run directory
      best.yaml             the config with the best trial's values, for `ftcli train`
"""

from __future__ import annotations

import copy
import csv
import io
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcli.commands.train import train_run
from ftcli.config import Config, dump_config, validate
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.fileio import atomic_write_text
from ftcli.metrics import higher_is_better, primary_metric
from ftcli.reporting.formatting import format_short, format_value
from ftcli.training.job import TrainingEvents
from ftcli.training.recipe import setup_data

# Trials that finish before the pruner compares anything: the median of fewer says little.
PRUNER_STARTUP_TRIALS = 3
# How often a worker waiting for other workers' last trials looks at the study again.
POLL_SECONDS = 1.0


@dataclass
class SweepResult:
    folder: Path
    metric: str  # the validation metric compared, e.g. accuracy (or loss, lower is better)
    rows: list[dict[str, Any]]  # trials.csv, one dict per trial
    trials_run: int  # by this command; the others were in the study already
    best_config: Path | None = None
    best: dict[str, Any] | None = None  # the best trial's row


@dataclass(frozen=True)
class _Search:
    """What every trial of one sweep shares."""

    optuna: Any
    study: Any
    base: dict[str, Any]  # the swept config, as a mapping
    folder: Path
    metric: str
    events: TrainingEvents | None
    say: Callable[[str], None]
    trials: int  # finished trials the study should hold in all
    worker: int = 0  # which of --workers this is

    @property
    def space(self) -> dict[str, Any]:
        return self.base["sweep"]


@dataclass(frozen=True)
class Workers:
    """How trials are shared out: --workers, --retry-failed and --heartbeat of ftcli sweep."""

    count: int = 1  # worker processes this command starts (1: it works itself)
    retry_failed: int = 0  # times a trial whose worker died is asked again, its run resumed
    heartbeat_seconds: int = 60  # a worker silent for twice this long is taken for dead


def run_sweep(
    config: Config,
    trials: int,
    storage: str | None = None,
    events: TrainingEvents | None = None,
    say: Callable[[str], None] = lambda line: None,
    workers: Workers = Workers(),
) -> SweepResult:
    """Run trials until the study holds `trials` finished (complete or pruned) ones; write the
    summary and best.yaml from the study. events: each trial's progress; say: a line per trial, as
    it starts and ends. workers: how many processes share the trials, and how dead ones are retried."""
    optuna = require("optuna", "sweep", "ftcli sweep")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # ftcli prints a line per trial itself

    # Setup: check every value the search may try, and tokenize the data once into the cache, so
    # that a mistake fails now rather than at trial 7.
    if not config.sweep:
        raise FtcliError(
            "the config has no sweep: section to search",
            "add one, e.g. sweep: {training.learning_rate: {low: 1.0e-5, high: 1.0e-4, log: true}}",
        )
    base = config.model_dump(mode="json")
    space = base["sweep"]
    check_space(base, space)
    _, _, prepared = setup_data(config)
    if "validation" not in prepared.splits:
        raise FtcliError("a sweep scores each trial on validation data, and this config has none", "set data.validation")
    folder = Path(config.output_dir) / f"{config.name}-sweep"
    if storage is None:
        folder.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{folder / 'study.db'}"
    storage = database_url(storage)
    metric = primary_metric(config.metrics)
    study = open_study(optuna, config.name, storage, space, metric, workers)
    # Only one worker here, on a store of one machine: a trial still running was interrupted.
    if workers.count == 1 and storage.startswith("sqlite"):
        fail_interrupted(optuna, study, workers)

    search = _Search(optuna, study, base, folder, metric, events, say, trials)
    if workers.count > 1:
        trials_run = spawn_workers(config, storage, search, workers)
    else:
        trials_run = work(search, config.training.seed)

    # Summary, from the study (every worker's trials): trials.csv, and the best trial's values as a config to train.
    study = optuna.load_study(study_name=config.name, storage=storage)
    finished = [trial for trial in study.trials if not trial.user_attrs.get("surplus")]
    rows = [_row(trial, metric) for trial in finished]
    atomic_write_text(folder / "trials.csv", _csv(rows))
    result = SweepResult(folder, metric, rows, trials_run)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        result.best = _row(best, metric)
        result.best_config = folder / "best.yaml"
        atomic_write_text(result.best_config, best_config_yaml(base, best.params, result.best, metric, len(completed)))
    return result


def database_url(storage: str) -> str:
    """SQLAlchemy's URL for the storage: postgresql:// (and postgres://) is read with psycopg 3,
    the driver of the postgres extra; SQLAlchemy's bare postgresql:// means psycopg2."""
    for scheme in ("postgresql://", "postgres://"):
        if storage.startswith(scheme):
            require("psycopg", "postgres", "ftcli sweep --storage postgresql://...")
            return "postgresql+psycopg://" + storage[len(scheme):]
    return storage


def work(search: _Search, seed: int, worker: int = 0) -> int:
    """One worker: trials until the study holds enough finished ones, counting those that other
    workers are running. Returns how many trials this worker ran."""
    optuna, study = search.optuna, search.study
    states = optuna.trial.TrialState
    # Seeded anew from the study's size, so that a resumed study draws new values; each worker of
    # one command apart from the others.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials) + 1000 * worker)
    trials_run = 0
    while True:
        with _ask_and_tell_with_heartbeats(optuna):
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial failed (and asked again, with retries)
        counts = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in states}
        finished = counts[states.COMPLETE] + counts[states.PRUNED]
        if finished >= search.trials:
            return trials_run
        if counts[states.WAITING] == 0 and finished + counts[states.RUNNING] >= search.trials:
            time.sleep(POLL_SECONDS)  # the last trials are another worker's: wait, in case that worker dies
            continue
        trials_run += run_trial(search)


def check_space(base: dict[str, Any], space: dict[str, Any]) -> None:
    """Every choice and both ends of every range must make a valid config: all problems at once."""
    problems = []
    for key, values in space.items():
        candidates = values if isinstance(values, list) else [values["low"], values["high"]]
        for value in candidates:
            raw = copy.deepcopy(base) | {"sweep": None}
            _assign(raw, key, value)
            try:
                validate(raw, source="sweep")
            except FtcliError as error:
                problems.append(error.message)
    if problems:
        raise FtcliError("; ".join(dict.fromkeys(problems)), "change the values in the sweep: section")


def open_study(optuna: Any, name: str, storage: str, space: dict[str, Any], metric: str, workers: Workers = Workers()) -> Any:
    """The study named after the experiment: created, or loaded to continue when the storage has it.
    Its storage records each running trial's heartbeat."""
    from sqlalchemy.exc import SQLAlchemyError  # optuna's storage layer

    try:
        study = optuna.create_study(
            study_name=name,
            storage=_rdb_storage(optuna, storage, workers),
            load_if_exists=True,
            direction="maximize" if higher_is_better(metric) else "minimize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS),
        )
    except (ValueError, ImportError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise FtcliError(
            f"cannot open the study in {storage}: {str(error).splitlines()[0]}",
            "give --storage sqlite:///PATH with a folder that exists, or postgresql://USER@HOST:PORT/DATABASE of a running server",
        ) from None
    # Values of another search space would mislead the sampler and the summary alike.
    searched = {"space": space, "metric": metric}
    if not study.user_attrs:
        for key, value in searched.items():
            study.set_user_attr(key, value)
    elif {key: study.user_attrs.get(key) for key in searched} != searched:
        raise FtcliError(
            f"the study '{name}' in {storage} searched another space or metric",
            "restore that sweep: section, or start a new study: another name, or another --storage",
        )
    return study


def _rdb_storage(optuna: Any, url: str, workers: Workers) -> Any:
    """Optuna's database storage with heartbeats, and a retry of a dead worker's trial up to
    workers.retry_failed times (the callback was renamed in Optuna 4.9)."""
    renamed = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=workers.heartbeat_seconds,
        grace_period=2 * workers.heartbeat_seconds,
        **{"heartbeat_stale_trial_callback" if renamed else "failed_trial_callback": _retry(optuna, workers)},
    )


def _retry(optuna: Any, workers: Workers) -> Callable[[Any, Any], None] | None:
    """Optuna's callback that asks a failed trial again with its values, or None without retries."""
    if not workers.retry_failed:
        return None
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return retry(max_retry=workers.retry_failed)


def fail_interrupted(optuna: Any, study: Any, workers: Workers) -> None:
    """Mark the trials still running as failed, and ask them again when retries are on: with one
    worker on SQLite nothing else can be running them, so they were interrupted (Ctrl-C, a kill)."""
    retry = _retry(optuna, workers)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if retry is not None:
            retry(study, study.get_trials(deepcopy=False)[trial.number])


def run_trial(search: _Search) -> int:
    """Train one trial's run; tell the study its validation score, or that it was pruned, or that it
    failed. A trial asked again after its worker died resumes that worker's run from its last
    checkpoint. Returns 1, or 0 when the trial was not needed after all (other workers asked for
    the last ones at the same moment)."""
    optuna, study, metric = search.optuna, search.study, search.metric
    with _ask_and_tell_with_heartbeats(optuna):
        trial = study.ask()
    if surplus(search, trial):
        trial.set_user_attr("surplus", True)  # left out of the summary: it never trained
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return 0
    values = {key: _suggest(trial, key, values) for key, values in search.space.items()}
    retried = trial.user_attrs.get("run_dir")  # a retry inherits the failed trial's attributes
    name = Path(retried).name if retried else f"{search.base['name']}-trial-{trial.number}"
    raw = copy.deepcopy(search.base) | {"name": name, "output_dir": str(search.folder), "sweep": None, "push_to_hub": None}
    for key, value in values.items():
        _assign(raw, key, value)
    config = validate(raw, source=name)
    trial.set_user_attr("run_dir", str(config.run_dir))
    trial.set_user_attr("worker", search.worker)
    again = f" (again: resuming {name})" if retried else ""
    search.say(f"trial {trial.number}{again}  " + "  ".join(f"{key}={format_short(value)}" for key, value in values.items()))
    pruning = _Pruning(trial, f"eval_{metric}")
    with heartbeat(optuna, study, trial):
        try:
            how = {"resume": "auto"} if retried else {"overwrite": True}
            result = train_run(config, events=search.events, on_evaluate=pruning, **how).result
        except BaseException:  # an interrupt too: the study must not keep the trial as running
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
    score = result.metrics["validation"][metric]
    if pruning.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        outcome = f"pruned at step {result.outcome.global_step}: {metric} {format_value(score)}"
    else:
        study.tell(trial, score)
        outcome = f"{metric} {format_value(score)}"
    search.say(f"trial {trial.number} {outcome}  ({config.run_dir})")
    return 1


def surplus(search: _Search, trial: Any) -> bool:
    """Whether the trials numbered before this one (finished, running or waiting) are enough
    already: two workers that looked at the study at once may both have asked for the last one.
    Trial numbers are handed out in order, so exactly the later of them finds itself surplus."""
    if trial.user_attrs.get("run_dir"):
        return False  # a retry always runs: its trial failed
    states = search.optuna.trial.TrialState
    alive = (states.COMPLETE, states.PRUNED, states.RUNNING, states.WAITING)
    before = [other for other in search.study.get_trials(deepcopy=False, states=alive) if other.number < trial.number]
    return len(before) >= search.trials


@contextmanager
def _ask_and_tell_with_heartbeats(optuna: Any) -> Iterator[None]:
    """Without Optuna's warnings that heartbeats are meant for Study.optimize and that
    fail_stale_trials is experimental: ftcli sends the heartbeats itself (heartbeat below)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@contextmanager
def heartbeat(optuna: Any, study: Any, trial: Any) -> Iterator[None]:
    """Tell the storage that this trial's worker lives, every heartbeat interval while it trains,
    as Optuna's own optimize loop does."""
    storage = study._storage
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"ftcli-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- several workers on one machine


def spawn_workers(config: Config, storage: str, search: _Search, workers: Workers) -> int:
    """Start workers.count processes that share the study, wait for them; how many trials they ran.
    Each takes one GPU where there are enough, and says each trial's line prefixed by its number."""
    import multiprocessing

    import torch

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with this one
    gpus = torch.cuda.device_count()
    counts = context.Queue()
    processes = [
        context.Process(
            target=_worker_main,
            args=(config, storage, search.trials, workers, index, str(index) if gpus >= workers.count else None, counts),
            name=f"ftcli-sweep-worker-{index}",
        )
        for index in range(workers.count)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [process.name for process in processes if process.exitcode != 0]
    trials_run = sum(counts.get() for _ in range(workers.count - len(failed)))
    states = search.optuna.trial.TrialState
    finished = search.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
    if failed and len(finished) < search.trials:
        raise FtcliError(
            f"{len(failed)} of {workers.count} sweep workers failed ({', '.join(failed)}); their messages are above",
            "fix the cause and run the same command again: the study continues",
        )
    if failed:  # and the others finished the study, retrying what the dead ones left
        search.say(f"{len(failed)} of {workers.count} workers died ({', '.join(failed)}); the others finished the study")
    return trials_run


def _worker_main(config: Config, storage: str, trials: int, workers: Workers, index: int, gpu: str | None, counts: Any) -> None:
    """A worker process started by --workers: quiet progress, one line per trial."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything initialises CUDA
    optuna = require("optuna", "sweep", "ftcli sweep")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = config.model_dump(mode="json")
    metric = primary_metric(config.metrics)
    study = open_study(optuna, config.name, storage, base["sweep"], metric, workers)
    folder = Path(config.output_dir) / f"{config.name}-sweep"
    search = _Search(optuna, study, base, folder, metric, None, lambda line: _say(f"worker {index}: {line}"), trials, index)
    counts.put(work(search, config.training.seed, worker=index))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Pruning:
    """Reports each evaluation to the trial; asks training to stop once the pruner says the trial trails."""

    def __init__(self, trial: Any, key: str) -> None:
        self.trial = trial
        self.key = key
        self.pruned = False

    def __call__(self, event: dict[str, Any]) -> bool:
        if self.key in event and not self.pruned:
            self.trial.report(event[self.key], step=event["step"])
            self.pruned = self.trial.should_prune()
        return self.pruned


def _suggest(trial: Any, key: str, values: Any) -> Any:
    if isinstance(values, list):
        return trial.suggest_categorical(key, values)
    low, high, log = values["low"], values["high"], values.get("log", False)
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, log=log)
    return trial.suggest_float(key, low, high, log=log)


def _assign(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (checked against the schema by the config) in a raw config."""
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = {}  # an absent optional section, e.g. lora when sweeping lora.r
        node = node[section]
    node[leaf] = value


# ---------------------------------------------------------------- the summary


def _row(trial: Any, metric: str) -> dict[str, Any]:
    value = trial.value if trial.state.name == "COMPLETE" else trial.intermediate_values.get(trial.last_step)
    return {"trial": trial.number, "state": trial.state.name.lower(), metric: value} | trial.params | {
        "run_dir": trial.user_attrs.get("run_dir", "")
    }


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def best_config_yaml(
    base: dict[str, Any], params: dict[str, Any], best: dict[str, Any], metric: str, completed: int
) -> str:
    """The swept config with the best trial's values, named <name>-best, under a comment saying where it came from."""
    raw = copy.deepcopy(base) | {"name": f"{base['name']}-best", "sweep": None}
    for key, value in params.items():
        _assign(raw, key, value)
    header = (
        f"# The best of {completed} completed trials of the sweep {base['name']}: trial {best['trial']}, "
        f"validation {metric} {format_value(best[metric])} ({best['run_dir']}).\n"
        "# Train it with `ftcli train` on this file.\n"
    )
    return header + dump_config(validate(raw, source="best.yaml"))


def ranked_rows(result: SweepResult) -> list[dict[str, Any]]:
    """The trials best first: completed ones by score, then pruned, then failed ones."""
    lower_is_better = not higher_is_better(result.metric)
    return sorted(result.rows, key=lambda row: _rank(row, result.metric, lower_is_better))


def _rank(row: dict[str, Any], metric: str, lower_is_better: bool) -> tuple:
    score = row.get(metric)
    state_order = {"complete": 0, "pruned": 1}.get(row["state"], 2)
    return (state_order, 0 if score is None else (score if lower_is_better else -score), row["trial"])
