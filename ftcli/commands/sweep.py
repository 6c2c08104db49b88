"""The sweep command: an Optuna study over the search space in the config's `sweep:` section.

Each trial is an ordinary run, trained by the train recipe into its own run directory. Every
evaluation is reported to Optuna, whose median pruner stops a trial that trails the earlier ones
at the same step; the pruned run ends as an early-stopped one, complete. The study lives in a
SQLite file beside the trials, so the same command run again continues it up to --trials in all.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

    @property
    def space(self) -> dict[str, Any]:
        return self.base["sweep"]


def run_sweep(
    config: Config,
    trials: int,
    storage: str | None = None,
    events: TrainingEvents | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> SweepResult:
    """Run trials until the study holds `trials` finished (complete or pruned) ones; write the
    summary and best.yaml. events: each trial's progress; say: a line per trial, as it starts and ends."""
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
    metric = primary_metric(config.metrics)
    study = open_study(optuna, config.name, storage, space, metric)
    study.sampler = optuna.samplers.TPESampler(seed=config.training.seed + len(study.trials))  # a resumed study draws new values

    # Trials, one after another, until enough have finished.
    search = _Search(optuna, study, base, folder, metric, events, say)
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials_run = 0
    while len(study.get_trials(deepcopy=False, states=finished_states)) < trials:
        run_trial(search)
        trials_run += 1

    # Summary: trials.csv, and the best trial's values as a config to train.
    rows = [_row(trial, metric) for trial in study.trials]
    atomic_write_text(folder / "trials.csv", _csv(rows))
    result = SweepResult(folder, metric, rows, trials_run)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        result.best = _row(best, metric)
        result.best_config = folder / "best.yaml"
        atomic_write_text(result.best_config, best_config_yaml(base, best.params, result.best, metric, len(completed)))
    return result


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


def open_study(optuna: Any, name: str, storage: str, space: dict[str, Any], metric: str) -> Any:
    """The study named after the experiment: created, or loaded to continue when the storage has it."""
    from sqlalchemy.exc import SQLAlchemyError  # optuna's storage layer

    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            load_if_exists=True,
            direction="maximize" if higher_is_better(metric) else "minimize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS),
        )
    except (ValueError, ImportError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise FtcliError(
            f"cannot open the study in {storage}: {str(error).splitlines()[0]}",
            "give --storage sqlite:///PATH, with a folder that exists",
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
    # A sweep runs one trial at a time: a trial still running when it starts was interrupted.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def run_trial(search: _Search) -> None:
    """Train one trial's run; tell the study its validation score, or that it was pruned, or that it failed."""
    optuna, study, metric = search.optuna, search.study, search.metric
    trial = study.ask()
    values = {key: _suggest(trial, key, values) for key, values in search.space.items()}
    name = f"{search.base['name']}-trial-{trial.number}"
    raw = copy.deepcopy(search.base) | {"name": name, "output_dir": str(search.folder), "sweep": None, "push_to_hub": None}
    for key, value in values.items():
        _assign(raw, key, value)
    config = validate(raw, source=name)
    trial.set_user_attr("run_dir", str(config.run_dir))
    search.say(f"trial {trial.number}  " + "  ".join(f"{key}={format_short(value)}" for key, value in values.items()))
    pruning = _Pruning(trial, f"eval_{metric}")
    try:
        result = train_run(config, overwrite=True, events=search.events, on_evaluate=pruning).result
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
