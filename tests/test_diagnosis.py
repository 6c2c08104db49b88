"""The automatic reading of learning curves: one synthetic metrics.jsonl per pattern gets its verdict,
and healthy noise does not trigger a false alarm."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from ftcli.data.prepare import SplitSummary
from ftcli.tasks.single_label import majority_baseline
from ftcli.reporting.diagnosis import diagnose
from ftcli.reporting.events import series

LOGS_PER_EVAL = 10
STEPS_PER_LOG = 5
BINARY = {"majority_class": "negative", "majority_rate": 0.5, "num_labels": 2}


def events_for(
    train: list[float],
    evals: list[float] = (),
    accuracy: list[float] | None = None,
    start_lr: float = 5e-5,
    metrics: dict[str, list[float]] | None = None,
) -> list[dict]:
    """metrics.jsonl events as the backends write them: a log every STEPS_PER_LOG steps, an
    evaluation (one epoch) every LOGS_PER_EVAL logs, with eval_accuracy or other metrics' values."""
    steps_per_epoch = LOGS_PER_EVAL * STEPS_PER_LOG
    total = len(train) * STEPS_PER_LOG
    events = []
    for index, loss in enumerate(train):
        step = (index + 1) * STEPS_PER_LOG
        lr = start_lr * (1 - step / (total + 1))
        events.append({"step": step, "epoch": step / steps_per_epoch, "train_loss": loss, "learning_rate": lr, "grad_norm": 1.0})
        if step % steps_per_epoch == 0 and step // steps_per_epoch <= len(evals):
            epoch = step // steps_per_epoch
            event = {"step": step, "epoch": float(epoch), "eval_loss": evals[epoch - 1]}
            if accuracy is not None:
                event["eval_accuracy"] = accuracy[epoch - 1]
            event |= {f"eval_{name}": values[epoch - 1] for name, values in (metrics or {}).items()}
            events.append(event)
    return events


def decaying(count: int, start: float = 0.69, floor: float = 0.05, rate: float = 12.0, noise: float = 0.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [floor + (start - floor) * math.exp(-index / rate) + rng.gauss(0, noise * start) for index in range(count)]


def eval_step(index: int) -> int:
    """The step of the index-th evaluation (0-based)."""
    return (index + 1) * LOGS_PER_EVAL * STEPS_PER_LOG


# ---------------------------------------------------------------- each pattern gets its verdict


def test_converged():
    events = events_for(decaying(60), [0.30, 0.21, 0.20, 0.195, 0.196, 0.195], [0.85, 0.9, 0.91, 0.91, 0.91, 0.91])
    diagnosis = diagnose(events, BINARY)
    assert diagnosis.verdict == "converged", diagnosis
    assert [finding.verdict for finding in diagnosis.findings] == ["converged"]
    assert diagnosis.findings[0].remedies == []


def test_still_improving():
    train = [0.69 - 0.006 * index for index in range(60)]  # still falling steadily at the end
    events = events_for(train, [0.62, 0.55, 0.49, 0.43, 0.38, 0.33], [0.6, 0.66, 0.7, 0.74, 0.77, 0.8])
    diagnosis = diagnose(events, BINARY, {"training": {"epochs": 6.0, "max_steps": None}})
    assert diagnosis.verdict == "still_improving", diagnosis
    finding = diagnosis.findings[0]
    assert finding.evidence["recent_gain_share"] > 0.05
    assert any("training.epochs (now 6)" in remedy for remedy in finding.remedies)


def test_overfitting_names_the_best_step():
    # Validation loss bottoms out at the third evaluation, then climbs while training loss keeps falling.
    events = events_for(decaying(60, floor=0.01), [0.45, 0.33, 0.30, 0.34, 0.40, 0.47], [0.8, 0.86, 0.88, 0.87, 0.86, 0.86])
    diagnosis = diagnose(events, BINARY, {"training": {"weight_decay": 0.0, "epochs": 6}})
    assert diagnosis.verdict == "overfitting", diagnosis
    finding = diagnosis.findings[0]
    assert finding.evidence["best_eval_step"] == eval_step(2)
    assert finding.evidence["best_metric_step"] == eval_step(2) and finding.evidence["best_metric_epoch"] == 3
    assert finding.evidence["eval_loss_rise"] == pytest.approx(0.47 / 0.30 - 1, rel=1e-3)
    assert finding.evidence["final_train_loss"] < finding.evidence["train_loss_at_best"]
    assert f"best at step {eval_step(2)}" in finding.summary
    assert f"accuracy, the first metric, peaked at step {eval_step(2)} (0.88)" in finding.summary
    remedies = " | ".join(finding.remedies)
    assert "training.early_stopping_patience: 2" in remedies and f"accuracy was best at step {eval_step(2)} (0.88)" in remedies
    assert "training.weight_decay (now 0)" in remedies and "accuracy was best at epoch 3 (now 6)" in remedies


def test_overfitting_from_a_widening_gap_while_validation_stalls():
    # Validation loss only drifts up 3% (under the rise threshold), but training loss keeps dropping.
    events = events_for(decaying(60, floor=0.01, rate=15), [0.45, 0.33, 0.30, 0.305, 0.31, 0.309])
    diagnosis = diagnose(events, BINARY)
    assert diagnosis.verdict == "overfitting", diagnosis
    finding = diagnosis.findings[0]
    assert "gap widened" in finding.summary
    assert finding.evidence["final_gap"] > finding.evidence["gap_at_best"] + 0.05
    assert finding.evidence["best_eval_step"] == eval_step(2)


def test_underfitting_flat_losses_at_the_majority_rate():
    train = [0.69 + random.Random(index).gauss(0, 0.005) for index in range(60)]
    events = events_for(train, [0.693, 0.692, 0.693, 0.692, 0.693, 0.692], [0.5] * 6)
    diagnosis = diagnose(events, BINARY, {"training": {"learning_rate": 1e-7}, "model": "minilm"})
    assert diagnosis.verdict == "underfitting", diagnosis
    finding = diagnosis.findings[0]
    assert finding.evidence["best_accuracy"] == 0.5 and finding.evidence["majority_rate"] == 0.5
    assert finding.evidence["chance_loss"] == pytest.approx(math.log(2), rel=1e-3)
    assert "stayed high" in finding.summary and "'negative'" in finding.summary
    remedies = " | ".join(finding.remedies)
    for expected in ("training.epochs", "raise training.learning_rate (now 1e-07)", "larger model (now minilm)", "check the data"):
        assert expected in remedies


def test_underfitting_when_only_the_class_prior_was_learned():
    # 90/10 data: the loss falls to the prior's entropy, but accuracy never beats "always negative".
    events = events_for(decaying(60, floor=0.33), [0.34, 0.33, 0.33, 0.33, 0.33, 0.33], [0.9] * 6)
    diagnosis = diagnose(events, {"majority_class": "negative", "majority_rate": 0.9, "num_labels": 2})
    assert diagnosis.verdict == "underfitting", diagnosis
    assert "stayed high" not in diagnosis.findings[0].summary
    assert "no better than always predicting 'negative' (90.0%)" in diagnosis.findings[0].summary


def test_unstable_spikes():
    train = decaying(60, noise=0.01)
    train[25] *= 6
    train[41] *= 8
    diagnosis = diagnose(events_for(train, [0.4, 0.3, 0.25, 0.22, 0.21, 0.2]), BINARY, {"training": {"learning_rate": 0.01}})
    assert diagnosis.verdict == "unstable", diagnosis
    finding = diagnosis.findings[0]
    assert finding.evidence["spike_steps"] == [26 * STEPS_PER_LOG, 42 * STEPS_PER_LOG]
    assert any("training.learning_rate (now 0.01)" in remedy for remedy in finding.remedies)
    assert any("training.max_grad_norm" in remedy for remedy in finding.remedies)
    assert any("training.batch_size" in remedy for remedy in finding.remedies)


def test_unstable_oscillation():
    train = [0.3 if index % 2 else 0.9 for index in range(60)]
    diagnosis = diagnose(events_for(train, [0.7, 0.8, 0.6, 0.75, 0.65, 0.7]), BINARY)
    assert diagnosis.verdict == "unstable", diagnosis
    assert diagnosis.findings[0].evidence["typical_jump_share"] > 0.5


def test_unstable_divergence():
    train = decaying(30, floor=0.15) + [0.15 * 1.12**index for index in range(30)]  # learns, then blows up
    diagnosis = diagnose(events_for(train, [0.3, 0.2, 0.18, 0.5, 1.2, 3.0]), BINARY)
    assert diagnosis.verdict == "unstable", diagnosis
    finding = diagnosis.findings[0]
    assert finding.evidence["final_train_loss"] > finding.evidence["start_train_loss"]
    assert "climbed" in finding.summary


def test_unstable_nan_names_the_step_and_stays_strict_json():
    train = decaying(40) + [math.nan] * 20
    diagnosis = diagnose(events_for(train, [0.4, 0.3, 0.25, 0.2, math.nan, math.nan]), BINARY, {"training": {"precision": "fp16"}})
    assert diagnosis.verdict == "unstable", diagnosis
    finding = diagnosis.findings[0]
    assert finding.evidence["first_non_finite_step"] == 41 * STEPS_PER_LOG
    assert "NaN" in finding.summary
    assert any("training.precision: bf16" in remedy for remedy in finding.remedies)
    json.dumps(diagnosis.to_json(), allow_nan=False)  # diagnosis.json is strict JSON


def test_too_few_points_is_inconclusive_unless_the_loss_is_nan():
    short = events_for([0.7, 0.6, 0.5], [0.55])
    assert diagnose(short, BINARY, {"training": {"logging_steps": 50}}).verdict == "inconclusive"
    assert "training.logging_steps (now 50)" in diagnose(short, None, {"training": {"logging_steps": 50}}).findings[0].remedies[0]
    broken = diagnose(events_for([0.7, math.inf, math.nan]))
    assert [finding.verdict for finding in broken.findings] == ["unstable", "inconclusive"]


# ---------------------------------------------------------------- borderline cases that must not trigger


@pytest.mark.parametrize("seed", range(10))
def test_healthy_noise_is_not_a_problem(seed):
    # 4% noise on every log and a validation curve that wobbles by a hair around its floor.
    train = decaying(80, noise=0.04, seed=seed)
    evals = [0.35, 0.24, 0.205, 0.2, 0.203, 0.199, 0.202, 0.2]
    diagnosis = diagnose(events_for(train, evals, [0.85, 0.9, 0.91, 0.92, 0.91, 0.92, 0.92, 0.92]), BINARY)
    assert diagnosis.verdict == "converged", diagnosis


def test_one_bad_batch_is_not_instability():
    train = decaying(60)
    train[30] *= 5
    diagnosis = diagnose(events_for(train, [0.3, 0.21, 0.2, 0.195, 0.196, 0.195]), BINARY)
    assert diagnosis.verdict == "converged", diagnosis


def test_jitter_near_zero_loss_is_not_overfitting_or_spikes():
    # Validation loss "rises" 0.001 -> 0.0016, and training logs bounce between 0.001 and 0.004.
    train = [max(value, 0.001) + (0.003 if index % 7 == 0 else 0) for index, value in enumerate(decaying(60, floor=0, rate=4))]
    diagnosis = diagnose(events_for(train, [0.01, 0.002, 0.001, 0.0012, 0.0014, 0.0016], [1.0] * 6), BINARY)
    assert diagnosis.verdict == "converged", diagnosis


def test_a_model_that_starts_good_is_not_underfitting():
    # Flat and low from the first log: a model already fine-tuned on the task, not a stuck one.
    train = [0.08 + random.Random(index).gauss(0, 0.004) for index in range(60)]
    diagnosis = diagnose(events_for(train, [0.1, 0.1, 0.099, 0.1, 0.1, 0.1], [0.97] * 6), BINARY)
    assert diagnosis.verdict == "converged", diagnosis


# ---------------------------------------------------------------- inputs


def test_series_keeps_the_last_value_of_a_step_logged_twice():
    # A run resumed from step 10 logs steps 15 and 20 again.
    events = [{"step": 10, "train_loss": 0.5}, {"step": 15, "train_loss": 0.9}, {"step": 15, "train_loss": 0.4}, {"step": 5, "train_loss": 0.6}]
    assert series(events, "train_loss") == [(5, 0.6), (10, 0.5), (15, 0.4)]


def test_majority_baseline_scores_the_training_majority_on_validation():
    def split(counts):
        return SplitSummary(sum(counts.values()), counts, 10.0, 12.0, 14, 0)

    summary = {"train": split({"neg": 70, "pos": 30}), "validation": split({"neg": 12, "pos": 8})}
    assert majority_baseline(summary) == {"majority_class": "neg", "majority_rate": 0.6, "num_labels": 2}
    assert majority_baseline({"train": summary["train"]}) is None


def test_evidence_holds_only_numbers():
    train = decaying(60, floor=0.01)
    diagnosis = diagnose(events_for(train, [0.45, 0.33, 0.30, 0.34, 0.40, 0.47]), BINARY)
    for finding in diagnosis.findings:
        for value in finding.evidence.values():
            assert value is None or isinstance(value, (int, float)) or all(isinstance(item, int) for item in value)


# ---------------------------------------------------------------- every task's own baseline


def test_a_regression_run_underfits_when_its_mse_stays_near_predicting_the_training_mean(tmp_path):
    from datasets import Dataset, DatasetDict

    from ftcli.data.prepare import Prepared, baselines

    summary = SplitSummary(4, {}, 5.0, 6.0, 7, 0)
    prepared = Prepared(
        DatasetDict({"train": Dataset.from_dict({"labels": [1.0, 2.0, 3.0, 2.0]}), "validation": Dataset.from_dict({"labels": [0.0, 4.0]})}),
        ["score"], {"train": summary, "validation": summary}, "f", tmp_path,
    )
    baseline = baselines(prepared, "regression")
    assert baseline["chance_loss"] == pytest.approx(((0 - 2) ** 2 + (4 - 2) ** 2) / 2)  # the training mean is 2
    flat = events_for([4.3] * 20, [4.2, 4.1, 4.1])
    diagnosis = diagnose(flat, baseline)
    assert diagnosis.verdict == "underfitting"
    assert "always predicting the training mean 2 scores 4" in diagnosis.findings[0].summary
    learned = events_for(decaying(20, start=4.0, floor=0.3), [1.0, 0.5, 0.4])
    assert diagnose(learned, baseline).verdict != "underfitting"


def test_a_multi_label_run_is_measured_against_the_label_priors(tmp_path):
    from datasets import Dataset, DatasetDict

    from ftcli.data.prepare import Prepared, baselines

    summary = SplitSummary(4, {"a": 1, "b": 2}, 5.0, 6.0, 7, 0)
    train = Dataset.from_dict({"labels": [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]})
    prepared = Prepared(DatasetDict({"train": train, "validation": train}), ["a", "b"], {"train": summary, "validation": summary}, "f", tmp_path)
    baseline = baselines(prepared, "multi_label")
    priors = np.array([0.25, 0.5])
    truth = np.asarray(train["labels"])
    expected = -(truth * np.log(priors) + (1 - truth) * np.log(1 - priors)).mean()
    assert baseline["chance_loss"] == pytest.approx(expected)
    assert diagnose(events_for([0.62] * 20, [0.61, 0.6, 0.6]), baseline).verdict == "underfitting"


# ---------------------------------------------------------------- the loss read beside the first metric (issue 28)

DEMO_STEPS_PER_EPOCH = 459  # configs/mrpc-minilm.yaml: MRPC's 3,668 training pairs in batches of 8
DEMO_CONFIG = {
    "task": "single_label",
    "model": "minilm",
    "metrics": ["accuracy", "f1"],
    "calibration": "temperature",
    "training": {"epochs": 3, "early_stopping_patience": None, "weight_decay": 0.0, "learning_rate": 5e-5},
}
DEMO_CALIBRATION = {
    "method": "temperature", "temperature": 1.62, "fitted_on": "validation",
    "before": {"ece": 0.1151, "brier": 0.2905, "log_loss": 0.5184},
    "after": {"ece": 0.0502, "brier": 0.2776, "log_loss": 0.4303},
}


def demo_events(eval_losses: list[float], accuracy: list[float], f1: list[float]) -> list[dict]:
    """`make demo`'s metrics.jsonl: a training loss every 50 steps, an evaluation at each epoch's end
    (steps 459, 918, 1377), the learning rate decaying linearly from 5e-5."""
    total = 3 * DEMO_STEPS_PER_EPOCH
    events = []
    for step in range(50, total + 1, 50):
        epoch = step / DEMO_STEPS_PER_EPOCH
        loss = 0.08 + 0.55 * math.exp(-step / 380) + 0.03 * math.sin(step / 37)  # 0.6 at the start, ~0.1 by the end
        events.append({"step": step, "epoch": epoch, "train_loss": loss, "learning_rate": 5e-5 * (1 - step / total), "grad_norm": 4.0})
    for index, (loss, acc, f1_value) in enumerate(zip(eval_losses, accuracy, f1)):
        step = (index + 1) * DEMO_STEPS_PER_EPOCH
        events.append({"step": step, "epoch": float(index + 1), "eval_loss": loss, "eval_accuracy": acc, "eval_f1": f1_value})
    return sorted(events, key=lambda event: event["step"])


def test_the_demo_is_overconfident_not_overfit():
    # Validation loss best at step 918 then up 20%, while accuracy (which picks the kept model) rose
    # 0.7868 -> 0.8137 and F1 0.8590 -> 0.8712: stopping at 918 would keep a model 2.7 points worse.
    events = demo_events([0.4552, 0.4376, 0.5262], [0.7623, 0.7868, 0.8137], [0.8472, 0.8590, 0.8712])
    diagnosis = diagnose(events, {"majority_class": "equivalent", "majority_rate": 0.6838, "num_labels": 2}, DEMO_CONFIG, DEMO_CALIBRATION)
    assert diagnosis.verdict == "overconfidence", diagnosis
    assert diagnosis.metric == "accuracy"
    assert [finding.verdict for finding in diagnosis.findings] == ["overconfidence"]
    finding = diagnosis.findings[0]
    assert "validation loss rose from step 918 (0.438 -> 0.526 at step 1377) but accuracy kept improving (0.7868 -> 0.8137" in finding.summary
    assert "the model grew overconfident and calibration corrected it (ECE 0.115 -> 0.050)" in finding.summary
    assert "overfitting" not in finding.summary.lower().replace("not overfitting", "")
    assert finding.evidence["best_eval_step"] == 918 and finding.evidence["best_metric_step"] == 1377
    assert finding.evidence["metric_at_best_loss"] == 0.7868 and finding.evidence["final_metric"] == 0.8137
    assert finding.evidence["ece_before"] == 0.1151 and finding.evidence["ece_after"] == 0.0502
    advice = " | ".join(finding.remedies)
    assert "fewer epochs" not in advice and "early_stopping_patience" not in advice and finding.remedies == []


def test_the_demo_without_calibration_is_told_to_calibrate():
    events = demo_events([0.4552, 0.4376, 0.5262], [0.7623, 0.7868, 0.8137], [0.8472, 0.8590, 0.8712])
    diagnosis = diagnose(events, None, DEMO_CONFIG | {"calibration": "none"})
    finding = diagnosis.findings[0]
    assert finding.verdict == "overconfidence" and "surer than it is right" in finding.summary
    assert finding.remedies == ["calibrate the probabilities after training: calibration: temperature (now none)"]


def test_accuracy_peaking_before_the_end_is_overfitting_and_the_advice_quotes_accuracy():
    # The same losses, but accuracy was best at step 918 and fell after it: now stopping there helps.
    events = demo_events([0.4552, 0.4376, 0.5262], [0.7623, 0.8137, 0.7868], [0.8472, 0.8712, 0.8590])
    diagnosis = diagnose(events, None, DEMO_CONFIG)
    assert diagnosis.verdict == "overfitting", diagnosis
    finding = diagnosis.findings[0]
    assert "accuracy, the first metric, peaked at step 918 (0.8137) and ended at 0.7868" in finding.summary
    assert finding.evidence["best_metric_step"] == 918 and finding.evidence["evaluations_after_best"] == 1
    assert "train fewer epochs: accuracy was best at epoch 2 (now 3)" in finding.remedies
    # Patience 2 would stop 2 evaluations after the best: no sooner than this run ended.
    assert not any("early_stopping_patience" in remedy for remedy in finding.remedies)


def test_early_stopping_advice_counts_what_patience_counts():
    # Loss best at the third evaluation, accuracy at the second: the advice quotes accuracy's step.
    events = events_for(decaying(60, floor=0.01), [0.45, 0.33, 0.30, 0.34, 0.40, 0.47], [0.8, 0.89, 0.88, 0.87, 0.86, 0.86])
    diagnosis = diagnose(events, BINARY, {"metrics": ["accuracy"], "training": {"early_stopping_patience": 3, "epochs": 6}})
    finding = diagnosis.findings[0]
    assert finding.verdict == "overfitting" and finding.evidence["best_metric_step"] == eval_step(1)
    assert (
        "stop early: set training.early_stopping_patience: 2 (now 3) (it counts evaluations without a better accuracy); "
        f"accuracy was best at step {eval_step(1)} (0.89)"
    ) in finding.remedies
    assert "train fewer epochs: accuracy was best at epoch 2 (now 6)" in finding.remedies


def test_a_loss_like_first_metric_is_best_where_it_is_lowest():
    # Regression picked by mse (lower is better), trained on Huber loss.
    config = {"task": "regression", "metrics": ["mse", "pearson"], "training": {"epochs": 6}}
    train, losses = decaying(60, floor=0.01), [0.45, 0.33, 0.30, 0.34, 0.40, 0.47]
    overfit = diagnose(events_for(train, losses, metrics={"mse": [0.9, 0.62, 0.64, 0.7, 0.75, 0.8]}), None, config)
    assert overfit.verdict == "overfitting" and overfit.metric == "mse"
    finding = overfit.findings[0]
    assert finding.evidence["best_metric_step"] == eval_step(1) and finding.evidence["best_metric"] == 0.62
    assert f"mse was best at step {eval_step(1)} (0.62)" in " | ".join(finding.remedies)
    # mse falling to its lowest at the end while the Huber loss rises: the kept model is the last one.
    improving = diagnose(events_for(train, losses, metrics={"mse": [0.9, 0.7, 0.64, 0.6, 0.55, 0.5]}), None, config)
    assert improving.verdict == "overconfidence", improving
    finding = improving.findings[0]
    assert "mse kept improving (0.64 -> 0.5 at step 300)" in finding.summary
    assert finding.remedies == []  # no calibration for regression, no stopping earlier


def test_more_training_is_not_advised_while_the_first_metric_falls():
    train = [0.69 - 0.006 * index for index in range(60)]
    falling = events_for(train, [0.62, 0.55, 0.49, 0.43, 0.38, 0.33], [0.6, 0.66, 0.7, 0.8, 0.79, 0.77])
    diagnosis = diagnose(falling, BINARY, {"training": {"epochs": 6}})
    assert diagnosis.verdict == "converged", diagnosis
    assert "accuracy, the first metric, did not improve over the last stretch (0.8 -> 0.77)" in diagnosis.findings[0].summary
    assert diagnosis.findings[0].remedies == []
