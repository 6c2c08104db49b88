"""After each optimizer step, eager or graphed alike: log, evaluate, checkpoint and stop, as due."""

from __future__ import annotations

from dataclasses import asdict

from ftcli.training.loop.evaluation import evaluate
from ftcli.training.loop.setup import Loop


def after_step(loop: Loop, step_examples: int, batches_in_epoch: int) -> bool:
    """Count the optimizer step just taken and do what is due at it; True when training ends here.
    Every process calls this at every optimizer step and decides alike."""
    state, training, job = loop.state, loop.training, loop.job
    state.optimizer_step += 1
    state.examples_seen += step_examples
    job.events.step(state.optimizer_step, step_examples)
    epoch_ended = state.batches_done == batches_in_epoch
    if epoch_ended:
        state.epoch, state.batches_done = state.epoch + 1, 0
    epoch = round(state.epoch + state.batches_done / batches_in_epoch, 4)
    finished = state.optimizer_step >= loop.total_steps
    interrupted = not finished and job.stop_signals.requested(state.optimizer_step)  # SIGINT, SIGTERM: save and stop
    timed = loop.save_timer.due(state.optimizer_step)  # first: with several processes, all take part in it
    log_due = state.optimizer_step % training.logging_steps == 0
    eval_due = loop.eval_loader is not None and (due(training.eval_every, state.optimizer_step, epoch_ended) or finished)
    # Checkpoints between evaluations are resume points; when they do not fall on every evaluation,
    # each evaluation is saved too, so that the best model is a checkpoint that was scored.
    scored_save = eval_due and training.saves_at_evaluations
    save_due = due(training.save_every, state.optimizer_step, epoch_ended) or finished or interrupted or timed or scored_save
    # A nan loss stops training before it is logged, evaluated or saved (a stop after evaluating
    # saves too, but then eval_due was true).
    if log_due or eval_due or save_due:
        loop.loss_watch.check(loop.accelerator, job.run, settle_saves=loop.checkpoints.close)
    if log_due:
        log_training(loop, epoch)
    score = evaluate_and_decide(loop, epoch) if eval_due else None
    if save_due or loop.stopped_early:
        save_checkpoint(loop, score)
    if interrupted:  # the caller waits for the checkpoint just started
        raise job.stop_signals.interrupted(job.run, state.optimizer_step)
    return finished or loop.stopped_early


def log_training(loop: Loop, epoch: float) -> None:
    """The training loss since the last log, over every process's examples: with the loss check,
    the only host sync of a training step, every logging_steps steps."""
    loss, examples = loop.accelerator.reduce(loop.window.clone()).tolist()
    event = {"step": loop.state.optimizer_step, "epoch": epoch, "train_loss": loss / examples}
    event["learning_rate"] = float(loop.scheduler.get_last_lr()[0])
    if loop.step.grad_norm is not None:
        event["grad_norm"] = float(loop.step.grad_norm)
    loop.job.log(event)
    loop.window.zero_()


def evaluate_and_decide(loop: Loop, epoch: float) -> float:
    """Score the validation split, log it, and stop early when patience or the caller says so.
    Returns the score of the metric that picks the best model."""
    state, training = loop.state, loop.training
    autocast = loop.job.runtime.autocast_dtype if loop.graphed else None  # Accelerate autocasts the eager model
    metrics = evaluate(loop.model, loop.eval_loader, loop.accelerator, loop.suite, loop.objective, autocast)
    asked_to_stop = loop.job.log({"step": state.optimizer_step, "epoch": epoch} | {f"eval_{k}": v for k, v in metrics.items()})
    score = metrics[loop.suite.primary]
    if improves(score, state.best_score, loop.suite.greater_is_better):
        state.best_score, state.evaluations_without_improvement = score, 0
    else:
        state.evaluations_without_improvement += 1
    patience = training.early_stopping_patience
    out_of_patience = bool(patience) and state.evaluations_without_improvement >= patience
    loop.stopped_early = out_of_patience or asked_to_stop
    return score


def save_checkpoint(loop: Loop, score: float | None) -> None:
    """Start writing a checkpoint in the background; the newest ones and the best evaluated one are
    kept. Only an evaluated checkpoint (with a score) can become the best: one saved between
    evaluations is a resume point."""
    state = loop.state
    target = loop.job.run.checkpoint_dir(state.optimizer_step)
    if score is not None and improves(score, state.best_checkpoint_score, loop.suite.greater_is_better):
        state.best_checkpoint, state.best_checkpoint_score = str(target), score
    loss, examples = loop.accelerator.reduce(loop.window.clone()).tolist()
    state.window_loss, state.window_examples = loss, int(examples)
    loop.checkpoints.save(
        target, loop.model, loop.job.tokenizer, loop.optimizer, loop.scheduler, asdict(state), state.best_checkpoint
    )
    loop.save_timer.restart()


def due(every: str | int, optimizer_step: int, epoch_ended: bool) -> bool:
    return epoch_ended if every == "epoch" else optimizer_step % every == 0


def improves(score: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (score > best if greater_is_better else score < best)
