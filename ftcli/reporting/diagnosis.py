"""Read learning curves the way the HF course does, and say what to do about them.

Verdicts: converged, still improving, overfitting, overconfidence, underfitting, unstable, weak spots (or
inconclusive when there are too few points to tell). Each finding carries its evidence as numbers
and the course's remedies, phrased as the config keys to change. Pure functions over metrics.jsonl
events: nothing here reads or writes files.

Losses are read beside the first metric (config.metrics[0]), which picks the kept model and is what
training.early_stopping_patience counts: advice to stop earlier or train less is given only where
that metric itself was better earlier, so following it never keeps a worse model. A validation loss
that rises while the first metric keeps improving is overconfidence (a classifier growing surer
than it is right, which calibration corrects), not overfitting.

Beside the curves, the task reads the kept model's validation scores (Task.score_findings): a
tagger's entity precision far from its recall, or entity types never found, are weak spots.

Losses are measured against one scale, the training loss at the start (about ln(classes) for a
fresh head), so each threshold below means the same thing for every task.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any, Literal, Mapping

from ftcli.metrics import higher_is_better, primary_metric
from ftcli.reporting.events import eval_metric_names, finite, series
from ftcli import tasks

Verdict = Literal[
    "unstable", "overfitting", "underfitting", "overconfidence", "weak_spots", "inconclusive", "still_improving", "converged"
]
# The headline is the first finding in this order: a problem to fix outranks a state to accept.
# weak_spots: what the task reads in the kept model's validation scores (Task.score_findings).
SEVERITY: tuple[Verdict, ...] = (
    "unstable", "overfitting", "underfitting", "overconfidence", "weak_spots", "inconclusive", "still_improving", "converged"
)

# Below this many logged training losses (and evaluations) any trend is indistinguishable from noise.
MIN_TRAIN_POINTS = 5
# Overfitting needs a best evaluation, something before it and something after it.
MIN_EVALUATIONS = 3
# Start and end levels are medians of up to this many logs, so one noisy log does not decide;
# few enough that an early spike or the first real drop does not leak into the start level.
LEVEL_POINTS = 3
# Differences smaller than this share of the starting loss are noise whatever their ratio:
# validation loss going 0.001 -> 0.002 doubles but means nothing.
NOISE_FLOOR = 0.02
# A loss that fell by less than this share of its reference has learned nothing worth the name.
LEARNED_SHARE = 0.2

# A spike is a log at least SPIKE_RATIO times the median of the SPIKE_WINDOW logs before it, and
# higher by SPIKE_MIN_RISE of the starting loss, so jitter near zero loss (0.01 -> 0.03) is not one.
SPIKE_RATIO = 2.0
SPIKE_WINDOW = 5
SPIKE_MIN_RISE = 0.25
# One spike can be one bad batch; two or more are a pattern a learning rate or batch size explains.
MIN_SPIKES = 2
# Oscillation: the typical jump between consecutive logs in the second half of training exceeds
# this share of the starting loss. Averaged over logging_steps, healthy noise stays far below it.
OSCILLATION_LEVEL = 0.2
# Divergence: the loss ends this many times above where it started, or gives back more than
# REBOUND_SHARE of what it had learned.
DIVERGENCE_RATIO = 1.5
REBOUND_SHARE = 0.5

# Overfitting: validation loss ends this much above its best (relative) while training loss falls,
OVERFIT_RISE = 0.1
# or the validation-minus-training gap widens by this share of the starting loss after
# validation's best, over at least GAP_EVALUATIONS evaluations (one late one may be noise).
GAP_WIDENING = 0.15
GAP_EVALUATIONS = 2
# Underfitting: best accuracy within this of always predicting the majority class; on small
# validation sets one or two examples move accuracy by that much.
NEAR_MAJORITY = 0.03
# Still improving: the last third of the evaluations (or last quarter of training losses)
# still gained this share of the starting loss.
STILL_IMPROVING_GAIN = 0.05

Evidence = dict[str, float | int | str | list[int] | None]


@dataclass
class Finding:
    verdict: Verdict
    summary: str
    evidence: Evidence
    remedies: list[str]


@dataclass
class Diagnosis:
    verdict: Verdict
    findings: list[Finding]
    metric: str = "loss"  # the first metric the findings read beside the losses

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the diagnosis


def diagnose(
    events: list[dict[str, Any]],
    baseline: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
) -> Diagnosis:
    """Every finding that applies, the most severe first.

    baseline: ftcli.data.prepare.majority_baseline() of the run's data (metrics.json "data"), for the accuracy check.
    config: the resolved config as a mapping, to phrase remedies with the current values and find the first metric.
    calibration: model/calibration.json when calibration ran, for its ECE before and after.
    validation: the kept model's validation scores (with eval_validation.json's "errors" when
    evaluated), which the task reads beyond the curves (Task.score_findings: a tagger's entity
    precision against its recall, the types it never finds).
    """
    advice = _Advice(config or {})
    train_all, evals_all = series(events, "train_loss"), series(events, "eval_loss")
    train, evals = finite(train_all), finite(evals_all)
    # The scale every threshold is a share of; a run with no finite training loss falls back on validation.
    start = _level([value for _, value in train], at_end=False) if train else None
    if start is None:
        start = evals[0][1] if evals else 1.0
    curve = _Curve(train, evals, max(start, 1e-12))
    selection = _selection(events, config or {})
    non_finite = sorted(step for step, value in train_all + evals_all if not math.isfinite(value))
    signals: dict[str, Any] = {"non_finite": non_finite} if non_finite else {}

    findings: list[Finding] = []
    if len(train) < MIN_TRAIN_POINTS and len(evals) < MIN_EVALUATIONS:
        findings.append(_too_short(len(train), len(evals), advice))
    else:
        signals |= _instability(curve)
        findings += [
            finding
            for finding in (
                _rising_loss(curve, selection, events, advice, calibration),
                # Raising the learning rate is the wrong advice for a run that is also unstable.
                _underfitting(curve, series(events, "eval_accuracy"), baseline or {}, advice, not signals),
            )
            if finding is not None
        ]
        if not findings and not signals:
            findings.append(_progress(curve, selection, advice))
    if signals:
        findings.append(_unstable(signals, curve, advice))
    findings += [
        Finding("weak_spots", found["summary"], found["evidence"], [remedy for remedy in found["remedies"] if remedy])
        for found in advice.task.score_findings(validation or {}, config or {})
    ]
    findings.sort(key=lambda finding: SEVERITY.index(finding.verdict))
    return Diagnosis(findings[0].verdict, findings, selection.name)


@dataclass
class _Selection:
    """The first metric's evaluations: it picks the kept model, and early_stopping_patience counts
    the evaluations that did not improve it."""

    name: str
    greater_is_better: bool
    points: list[tuple[int, float]]  # finite, in step order

    @property
    def label(self) -> str:
        return "validation loss" if self.name == "loss" else self.name

    def better(self, value: float, than: float) -> bool:
        return value > than if self.greater_is_better else value < than

    def best(self) -> tuple[int, float]:
        """The first evaluation at the best value: to early stopping a later tie is no improvement."""
        best = self.points[0]
        for point in self.points[1:]:
            best = point if self.better(point[1], best[1]) else best
        return best

    def peaked_early(self) -> bool:
        return bool(self.points) and self.best()[0] < self.points[-1][0]

    def value_at(self, step: int) -> float | None:
        """The last evaluation at or before a step."""
        before = [value for evaluated, value in self.points if evaluated <= step]
        return before[-1] if before else None


def _selection(events: list[dict[str, Any]], config: Mapping[str, Any]) -> _Selection:
    """config.metrics[0] as training picks it (the first built-in metric, else the loss); without a
    config, the metrics in the order the run logged them."""
    named = config.get("metrics") or [name for name in eval_metric_names(events) if name != "loss"]
    name = primary_metric(list(named))
    points = finite(series(events, f"eval_{name}"))
    if not points:
        name, points = "loss", finite(series(events, "eval_loss"))
    return _Selection(name, higher_is_better(name), points)


@dataclass
class _Curve:
    train: list[tuple[int, float]]
    evals: list[tuple[int, float]]
    scale: float  # the starting training loss

    @property
    def train_values(self) -> list[float]:
        return [value for _, value in self.train]

    @property
    def eval_values(self) -> list[float]:
        return [value for _, value in self.evals]

    def train_level_at(self, step: int) -> float | None:
        """The training loss around a step: median of the last few logs up to it."""
        before = [value for logged, value in self.train if logged <= step]
        return _level(before, at_end=True) if before else None


def _level(values: list[float], at_end: bool) -> float:
    count = min(LEVEL_POINTS, len(values))
    return median(values[-count:] if at_end else values[:count])


def _num(value: float | None) -> float | None:
    """Four significant digits: evidence to read, not to recompute from."""
    return None if value is None else float(f"{value:.4g}")


# ---------------------------------------------------------------- unstable


def _instability(curve: _Curve) -> dict[str, Any]:
    """Spikes, oscillation and divergence of the training loss; an empty dict when healthy."""
    values, scale = curve.train_values, curve.scale
    signals: dict[str, Any] = {}
    spikes = _spikes(curve)
    if len(spikes) >= MIN_SPIKES:
        signals["spikes"] = spikes
    second_half = values[len(values) // 2 :]
    if len(second_half) >= 4:
        jump = median(abs(after - before) for before, after in zip(second_half, second_half[1:])) / scale
        if jump > OSCILLATION_LEVEL:
            signals["oscillation"] = jump
    if len(values) >= MIN_TRAIN_POINTS:
        end = _level(values, at_end=True)
        lowest = min(median(values[index : index + LEVEL_POINTS]) for index in range(len(values) - LEVEL_POINTS + 1))
        learned = scale - lowest
        rebound = learned > LEARNED_SHARE * scale and end - lowest > REBOUND_SHARE * learned
        if end > DIVERGENCE_RATIO * scale or rebound:
            signals["divergence"] = (end, lowest)
    return signals


def _spikes(curve: _Curve) -> list[int]:
    """Steps whose training loss jumped well above the logs just before them."""
    values, spikes = curve.train_values, []
    for index in range(1, len(values)):
        local = median(values[max(0, index - SPIKE_WINDOW) : index])
        if values[index] > SPIKE_RATIO * local and values[index] - local > SPIKE_MIN_RISE * curve.scale:
            spikes.append(curve.train[index][0])
    return spikes


def _unstable(signals: dict[str, Any], curve: _Curve, advice: _Advice) -> Finding:
    evidence: Evidence = {"start_train_loss": _num(curve.scale) if curve.train else None}
    said: list[str] = []
    if "non_finite" in signals:
        evidence |= {"first_non_finite_step": min(signals["non_finite"]), "non_finite_losses": len(signals["non_finite"])}
        said.append(f"the loss became NaN or infinite at step {min(signals['non_finite'])}")
    if "spikes" in signals:
        evidence |= {"spikes": len(signals["spikes"]), "spike_steps": signals["spikes"][:10]}
        steps = ", ".join(map(str, signals["spikes"][:5]))
        said.append(f"the training loss spiked {len(signals['spikes'])} times (steps {steps})")
    if "oscillation" in signals:
        evidence["typical_jump_share"] = _num(signals["oscillation"])
        said.append(f"the training loss jumps by {signals['oscillation']:.0%} of its starting value from log to log")
    if "divergence" in signals:
        end, lowest = signals["divergence"]
        evidence |= {"lowest_train_loss": _num(lowest), "final_train_loss": _num(end)}
        said.append(f"the training loss climbed from its low of {lowest:.3g} back to {end:.3g} (it started at {curve.scale:.3g})")
    remedies = [advice.lower_learning_rate(), advice.warmup(), advice.clipping(), advice.larger_batch()]
    if "non_finite" in signals:
        remedies += [advice.precision(), advice.check_data("an empty or corrupt example can make the loss NaN")]
    summary = "Unstable training: " + "; ".join(said) + "."
    return Finding("unstable", summary, evidence, [remedy for remedy in remedies if remedy])


# ---------------------------------------------------------------- overfitting, or overconfidence


@dataclass
class _Rise:
    """Validation loss past its best: where it was best, where it ended, and training loss at both."""

    best_step: int
    best_loss: float
    last_step: int
    last_loss: float
    train_at_best: float
    train_end: float
    rising: bool  # validation loss itself climbed, not only the gap to training loss

    def evidence(self) -> Evidence:
        return {
            "best_eval_step": self.best_step,
            "best_eval_loss": _num(self.best_loss),
            "final_eval_loss": _num(self.last_loss),
            "eval_loss_rise": _num((self.last_loss - self.best_loss) / self.best_loss),
            "train_loss_at_best": _num(self.train_at_best),
            "final_train_loss": _num(self.train_end),
            "gap_at_best": _num(self.best_loss - self.train_at_best),
            "final_gap": _num(self.last_loss - self.train_end),
        }

    def said(self) -> str:
        if self.rising:
            rise = (self.last_loss - self.best_loss) / self.best_loss
            return (
                f"validation loss was best at step {self.best_step} ({self.best_loss:.3g}) and rose {rise:.0%} to "
                f"{self.last_loss:.3g} by step {self.last_step}, while training loss fell from {self.train_at_best:.3g} "
                f"to {self.train_end:.3g}"
            )
        return (
            f"validation loss stopped improving at step {self.best_step} ({self.best_loss:.3g}) while training loss kept "
            f"falling: the gap widened from {self.best_loss - self.train_at_best:.3g} to {self.last_loss - self.train_end:.3g}"
        )


def _loss_rise(curve: _Curve) -> _Rise | None:
    """Validation loss rising from its best while training loss falls, or a widening gap."""
    if len(curve.evals) < MIN_EVALUATIONS or not curve.train:
        return None
    losses = curve.eval_values
    best_index = losses.index(min(losses))
    best_step, best_loss = curve.evals[best_index]
    last_step, last_loss = curve.evals[-1]
    train_at_best = curve.train_level_at(best_step)
    train_end = _level(curve.train_values, at_end=True)
    if best_index == len(losses) - 1 or train_at_best is None:
        return None
    rise = last_loss - best_loss
    rising = rise > OVERFIT_RISE * best_loss and rise > NOISE_FLOOR * curve.scale and train_end < train_at_best
    widening = (last_loss - train_end) - (best_loss - train_at_best)
    widened = widening > GAP_WIDENING * curve.scale and len(losses) - 1 - best_index >= GAP_EVALUATIONS
    if not (rising or widened):
        return None
    return _Rise(best_step, best_loss, last_step, last_loss, train_at_best, train_end, rising)


def _rising_loss(
    curve: _Curve,
    selection: _Selection,
    events: list[dict[str, Any]],
    advice: _Advice,
    calibration: Mapping[str, Any] | None,
) -> Finding | None:
    """Overfitting when the first metric was better earlier; overconfidence when only the loss says so."""
    rise = _loss_rise(curve)
    if rise is None:
        return None
    if selection.peaked_early():
        return _overfitting(rise, selection, events, advice)
    # The first metric ends at its best, so the kept model is the last one and stopping earlier would
    # keep a worse one. A gap that only widened says nothing more: the healthy verdicts read the rest.
    return _overconfidence(rise, selection, advice, calibration) if rise.rising else None


def _overfitting(rise: _Rise, selection: _Selection, events: list[dict[str, Any]], advice: _Advice) -> Finding:
    best_step, best_value = selection.best()
    final = selection.points[-1][1]
    after_best = sum(1 for step, _ in selection.points if step > best_step)
    best_epoch = _epoch_at(events, best_step)
    evidence = rise.evidence() | {
        "best_metric_step": best_step,
        "best_metric_epoch": best_epoch,
        "best_metric": _num(best_value),
        "final_metric": _num(final),
        "evaluations_after_best": after_best,
    }
    what = rise.said()
    if selection.name != "loss":
        what += f"; {selection.name}, the first metric, peaked at step {best_step} ({best_value:.4g}) and ended at {final:.4g}"
    remedies = [
        advice.early_stopping(selection, after_best),
        advice.fewer_epochs(selection.label, best_epoch),
        advice.weight_decay(),
        advice.lower_learning_rate(),
        "more training data, or check that validation comes from the same distribution as training",
    ]
    return Finding("overfitting", f"Overfitting: {what}.", evidence, [remedy for remedy in remedies if remedy])


def _overconfidence(rise: _Rise, selection: _Selection, advice: _Advice, calibration: Mapping[str, Any] | None) -> Finding:
    """The loss punishes confident mistakes harder as the model grows surer; the first metric, which
    picks the kept model, still improved, so the remedy is calibration, not stopping."""
    at_best = selection.value_at(rise.best_step)
    final_step, final = selection.points[-1]
    evidence = rise.evidence() | {"metric_at_best_loss": _num(at_best), "best_metric_step": final_step, "final_metric": _num(final)}
    kept = f"{selection.name} kept improving" + (f" ({at_best:.4g} -> {final:.4g} at step {final_step})" if at_best is not None else "")
    said = (
        f"validation loss rose from step {rise.best_step} ({rise.best_loss:.3g} -> {rise.last_loss:.3g} at step {rise.last_step}) "
        f"but {kept}, and {selection.name}, the first metric, picks the kept model"
    )
    remedies: list[str | None] = []
    if calibration and "before" in calibration and "after" in calibration:
        before, after = calibration["before"]["ece"], calibration["after"]["ece"]
        evidence |= {"ece_before": _num(before), "ece_after": _num(after)}
        said += f"; the model grew overconfident and calibration corrected it (ECE {before:.3f} -> {after:.3f})"
    elif advice.task.calibrates:
        said += "; the model grew overconfident: its probabilities are surer than it is right"
        remedies.append(advice.calibrate())
    return Finding("overconfidence", f"Overconfidence, not overfitting: {said}.", evidence, [r for r in remedies if r])


def _epoch_at(events: list[dict[str, Any]], step: int) -> float | None:
    epochs = series(events, "epoch")
    at = [epoch for logged, epoch in epochs if logged == step]
    return _num(at[0]) if at else None


# ---------------------------------------------------------------- underfitting


def _underfitting(
    curve: _Curve,
    accuracy: list[tuple[int, float]],
    baseline: Mapping[str, Any],
    advice: _Advice,
    may_raise_learning_rate: bool,
) -> Finding | None:
    """Losses that stayed near chance, or accuracy that never beat predicting the majority class."""
    # "High" is measured against the loss of a model that learned nothing, when the data tells it:
    # the task's best constant guess (chance_loss: the training mean for regression, the label
    # priors for multi_label), else ln(classes) of a uniform guess; so a model that starts good
    # and stays flat is not called underfit.
    num_labels = baseline.get("num_labels")
    known = "chance_loss" in baseline or bool(num_labels and num_labels > 1)
    reference = baseline.get("chance_loss") or (math.log(num_labels) if known else curve.scale)
    chance = baseline.get("chance", "a uniform guess")
    high = (1 - LEARNED_SHARE) * reference
    train_end = _level(curve.train_values, at_end=True) if curve.train else None
    best_eval = min(curve.eval_values) if curve.evals else None
    stuck = (train_end is None or train_end >= high) and (best_eval is None or best_eval >= high)
    majority = baseline.get("majority_rate")
    best_accuracy = max((value for _, value in accuracy if math.isfinite(value)), default=None)
    no_skill = majority is not None and best_accuracy is not None and best_accuracy <= majority + NEAR_MAJORITY
    if not (stuck or no_skill):
        return None

    evidence: Evidence = {
        "start_train_loss": _num(curve.scale),
        "final_train_loss": _num(train_end),
        "best_eval_loss": _num(best_eval),
        "chance_loss": _num(reference) if known else None,
        "best_accuracy": _num(best_accuracy),
        "majority_rate": _num(majority),
    }
    said = []
    if stuck:
        pairs = (("training", train_end), ("best validation", best_eval))
        losses = ", ".join(f"{name} {value:.3g}" for name, value in pairs if value is not None)
        against = f"{chance} scores {reference:.3g}" if known else f"training started at {curve.scale:.3g}"
        said.append(f"the losses stayed high ({losses}; {against})")
    if no_skill:
        said.append(
            f"the best accuracy {best_accuracy:.1%} is no better than always predicting "
            f"'{baseline.get('majority_class')}' ({majority:.1%})"
        )
    remedies = [
        advice.more_epochs(),
        advice.higher_learning_rate() if stuck and may_raise_learning_rate else None,
        advice.larger_model(),
        advice.check_data(
            "labels must match the texts (data.label_field, data.text_fields); `ftcli prepare` shows the label counts"
        ),
    ]
    summary = "Underfitting: " + "; ".join(said) + "."
    return Finding("underfitting", summary, evidence, [remedy for remedy in remedies if remedy])


# ---------------------------------------------------------------- healthy: still improving or converged


def _progress(curve: _Curve, selection: _Selection, advice: _Advice) -> Finding:
    """How much the last stretch gained: on validation when evaluated at least twice, else on training.
    More training is advised only while the first metric has not got worse over that stretch."""
    declined: tuple[float, float] | None = None
    if len(curve.evals) >= 2:
        losses = curve.eval_values
        span = max(1, len(losses) // 3)
        gain, measured = (losses[-1 - span] - losses[-1]) / curve.scale, "validation"
        before = selection.value_at(curve.evals[-1 - span][0])
        if selection.points and before is not None and selection.better(before, selection.points[-1][1]):
            declined = (before, selection.points[-1][1])
    else:
        values = curve.train_values
        third_quarter, last_quarter = values[len(values) // 2 : 3 * len(values) // 4], values[3 * len(values) // 4 :]
        gain, measured = (median(third_quarter) - median(last_quarter)) / curve.scale, "training"
    evidence: Evidence = {
        "start_train_loss": _num(curve.scale),
        "final_train_loss": _num(_level(curve.train_values, at_end=True) if curve.train else None),
        "final_eval_loss": _num(curve.evals[-1][1]) if curve.evals else None,
        "best_eval_step": min(curve.evals, key=lambda pair: pair[1])[0] if curve.evals else None,
        "best_metric_step": selection.best()[0] if selection.points else None,
        "recent_gain_share": _num(gain),
    }
    if gain >= STILL_IMPROVING_GAIN and declined is None:
        summary = (
            f"Still improving: {measured} loss gained {gain:.0%} of the starting loss over the last stretch; "
            "more training should help."
        )
        return Finding("still_improving", summary, evidence, [advice.more_epochs()])
    summary = f"Converged: {measured} loss has flattened (last stretch gained {max(gain, 0):.1%} of the starting loss)."
    if declined is not None and gain >= STILL_IMPROVING_GAIN:
        summary = (
            f"Converged: validation loss still fell, but {selection.name}, the first metric, did not improve over the "
            f"last stretch ({declined[0]:.4g} -> {declined[1]:.4g}); more training would not help it."
        )
    return Finding("converged", summary, evidence, [])


def _too_short(train_points: int, evaluations: int, advice: _Advice) -> Finding:
    summary = (
        f"Inconclusive: {train_points} training logs and {evaluations} evaluations are too few to read a trend "
        f"(need {MIN_TRAIN_POINTS} logs or {MIN_EVALUATIONS} evaluations)."
    )
    remedies = [advice.log_more_often(), "train for more steps"]
    return Finding("inconclusive", summary, {"train_points": train_points, "evaluations": evaluations}, remedies)


# ---------------------------------------------------------------- remedies, in config keys


class _Advice:
    """The course's remedies, each naming the key to change and its current value when known."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.model = config.get("model")
        self.task = tasks.get(config.get("task") or tasks.DEFAULT)
        self.calibration = config.get("calibration")
        self.training: Mapping[str, Any] = config.get("training") or {}

    def _now(self, key: str, off: str = "off") -> str:
        if key not in self.training:
            return ""
        value = self.training[key]
        shown = off if value is None else f"{value:g}" if isinstance(value, float) else value
        return f" (now {shown})"

    def lower_learning_rate(self) -> str:
        return f"lower training.learning_rate{self._now('learning_rate')} by 3x to 10x"

    def higher_learning_rate(self) -> str:
        return f"if the loss barely moved, raise training.learning_rate{self._now('learning_rate')}"

    def warmup(self) -> str | None:
        if self.training.get("warmup_ratio"):
            return None
        return f"warm the learning rate up: training.warmup_ratio: 0.1{self._now('warmup_ratio')}"

    def clipping(self) -> str:
        if self.training.get("max_grad_norm") is None:
            return f"clip gradients: training.max_grad_norm: 1.0{self._now('max_grad_norm')}"
        return f"clip harder: lower training.max_grad_norm{self._now('max_grad_norm')}, e.g. to 0.5"

    def larger_batch(self) -> str:
        return (
            f"average over more examples per step: raise training.batch_size{self._now('batch_size')} "
            f"or training.grad_accum{self._now('grad_accum')}"
        )

    def precision(self) -> str | None:
        if self.training.get("precision") != "fp16":
            return None
        return "fp16 overflows easily: use training.precision: bf16 (or fp32) (now fp16)"

    def early_stopping(self, selection: _Selection, evaluations_after_best: int) -> str | None:
        """A patience that would have stopped this run sooner; None when none would (it stops
        `patience` evaluations after the first metric's best)."""
        patience = self.training.get("early_stopping_patience")
        suggested = min(2, patience - 1) if patience else 2
        if suggested < 1 or evaluations_after_best <= suggested:
            return None
        best_step, best_value = selection.best()
        return (
            f"stop early: set training.early_stopping_patience: {suggested}{self._now('early_stopping_patience')} "
            f"(it counts evaluations without a better {selection.label}); {selection.label} was best at step "
            f"{best_step} ({best_value:.4g})"
        )

    def fewer_epochs(self, measured: str, best_epoch: float | None) -> str | None:
        if best_epoch is None:
            return None
        return f"train fewer epochs: {measured} was best at epoch {best_epoch:g}{self._now('epochs')}"

    def calibrate(self) -> str | None:
        if self.calibration == "temperature":
            return None  # asked for but skipped (training said why): no setting to change
        now = f" (now {self.calibration})" if self.calibration else ""
        return f"calibrate the probabilities after training: calibration: temperature{now}"

    def weight_decay(self) -> str:
        target = "e.g. to 0.01" if not self.training.get("weight_decay") else "e.g. double it"
        return f"regularize: raise training.weight_decay{self._now('weight_decay')}, {target}"

    def more_epochs(self) -> str:
        return f"train longer: raise training.epochs{self._now('epochs', 'unset')} or training.max_steps{self._now('max_steps', 'unset')}"

    def larger_model(self) -> str:
        now = f" (now {self.model})" if self.model else ""
        return f"if longer training plateaus, try a larger model{now}"

    def check_data(self, why: str) -> str:
        return f"check the data: {why}"

    def log_more_often(self) -> str:
        return (
            f"log and evaluate more often: lower training.logging_steps{self._now('logging_steps')}, "
            f"set training.eval_every to a step count{self._now('eval_every')}"
        )
