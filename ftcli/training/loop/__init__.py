"""Backend `loop`: ftcli's own training loop on Accelerate, readable top to bottom.

The Hugging Face course's loop (prepare, accumulate, backward, clip, step, schedule, evaluate
through gather_for_metrics), made exact and resumable:

- an epoch's data order is a permutation seeded by (seed, epoch), cut into global micro-batches
  that the processes share; a resumed run slices it where its checkpoint stopped instead of
  replaying the batches already trained on (plan.py);
- each optimizer step's gradient is the mean over exactly the examples it trained on, whatever
  the accumulation, the number of processes, or a shorter last batch (steps.py);
- a checkpoint holds the weights, optimizer, schedule, scaler, every RNG and the loop's counters,
  written in the background while training goes on (checkpointing.py).

The table of contents: setup (setup.py), then steps until the last, each an eager or a graphed
step (steps.py, graphs.py) followed by the same decisions (after_step.py), then finish.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ftcli import tasks
from ftcli.config import Config
from ftcli.errors import FtcliError
from ftcli.runs.checkpoints import load_weights
from ftcli.training.flops import all_fed, flop_rates
from ftcli.training.job import TrainJob, TrainOutcome
from ftcli.training.loop.after_step import after_step
from ftcli.training.loop.graphs import CaptureFailed
from ftcli.training.loop.setup import Loop, build_loop, family_why_eager, why_eager

log = logging.getLogger("ftcli")

# Why a run replays CUDA graphs, by training.compile (metrics.json's kernels record).
GRAPHED_WHY = {
    "cuda_graphs": "training.compile: cuda_graphs",
    "auto": "auto: one CUDA process, no accumulation, adamw, the training set on the GPU",
}
# accelerate launch sets these from a config file that shards the model.
SHARDING_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


class LoopBackend:
    def check(self, config: Config) -> None:
        """Fail before anything is written when the launch shards the model, which the loop does not do."""
        for variable, name in SHARDING_LAUNCHES.items():
            if os.environ.get(variable, "false").lower() == "true":
                raise FtcliError(
                    f"this launch shards the model with {name}, and the loop backend trains one whole model per process",
                    "set backend: trainer (or pass --backend trainer) to train with FSDP or DeepSpeed",
                )

    def train(self, job: TrainJob) -> TrainOutcome:
        """Replay CUDA graphs where they can work, else (or where this model's step cannot be
        captured, said in one warning) eager steps; metrics.json's kernels record says which and why."""
        training, runtime = job.config.training, job.runtime
        why = why_eager(training, job.prepared.splits["train"], runtime.device)
        if not why:
            why = family_why_eager(job.model)
            if not why:
                try:
                    # A graphed run trains without cuDNN's attention, which plans anew for every input shape
                    # (measured: capture 1.1 s instead of 2.1 s, the same step time). Eager steps keep it:
                    # the trainer backend measured 1.10x of HF Trainer at batch 8 with it, 0.82-0.92x
                    # without (in different runs, not isolated in one). Evaluation goes without it either way.
                    with runtime.attention_kernels():
                        return self._train(job, graphs=True, why=GRAPHED_WHY[training.compile])
                except CaptureFailed as failure:
                    why = f"this model's step cannot be captured as a CUDA graph ({failure})"
                    if training.compile == "cuda_graphs":
                        raise FtcliError(why, "set training.compile: auto (falls back to eager steps) or none") from None
            # Outside the except clause, so that the failed attempt's tensors are freed first.
            log.warning("training with eager steps: %s", why)
        return self._train(job, graphs=False, why=why)

    def _train(self, job: TrainJob, graphs: bool, why: str) -> TrainOutcome:
        loop = build_loop(job, graphs)
        try:
            train_steps(loop)
        except BaseException:
            loop.checkpoints.close()  # what was saved is on disk before the error is reported
            raise
        return finish(loop, why)


def train_steps(loop: Loop) -> None:
    """Optimizer steps until the last, epoch after epoch; a resumed run enters its epoch at the
    micro-batch its checkpoint stopped at."""
    state, plan = loop.state, loop.plan
    loop.job.events.start(loop.total_steps, initial_step=state.optimizer_step)
    loop.started = time.perf_counter()
    loop.save_timer.restart()  # save_every_minutes counts minutes of training, not of setting up
    loop.model.train()
    if state.optimizer_step >= loop.total_steps:  # resumed at the end: nothing left
        return
    while True:
        batches = plan.epoch_batches(state.epoch)
        for batch in loop.step.batches(batches[state.batches_done :]):
            step_examples = plan.step_examples(batches, state.batches_done)
            micro = loop.step(batch, step_examples)
            loop.window[0] += micro.loss_sum.detach()
            loop.loss_watch.observe(micro.loss_sum, state.optimizer_step + 1)
            loop.window[1] += micro.rows
            state.batches_done += 1
            if micro.stepped and after_step(loop, step_examples, len(batches)):
                return


def finish(loop: Loop, why: str) -> TrainOutcome:
    """The weights to keep (the best checkpoint's when there was a validation split, else the last
    ones) and the counts, with how the steps ran (`why`: the reason for graphed or eager steps).
    The last checkpoint may still be being written: the recipe saves and scores the model
    meanwhile, then settles it."""
    state, accelerator, step = loop.state, loop.accelerator, loop.step
    loop.job.events.stop()
    seconds = time.perf_counter() - loop.started
    real_tokens, fed = all_fed(accelerator, step.real_tokens, step.fed)
    model = accelerator.unwrap_model(loop.model, keep_fp32_wrapper=False)
    # The model holds the best weights already when the best is the last: the one still being written.
    if state.best_checkpoint is not None and state.best_checkpoint != str(loop.checkpoints.newest):
        loop.checkpoints.wait_for(Path(state.best_checkpoint))
        load_weights(model, Path(state.best_checkpoint))
    how: dict = {"steps": "eager"}
    fused = loop.step.graphed.fused if loop.graphed else None
    if loop.graphed:
        how = {"steps": "cuda_graphs", "capture_seconds": loop.capture_seconds, "fused_modules": len(fused) if fused else 0}
    how["kernels"] = {"step": how["steps"], "why": why, "fused": fused.names() if fused else [], "not_fused": loop.not_fused}
    return TrainOutcome(
        model=model,
        global_step=state.optimizer_step,
        epoch=state.epoch + state.batches_done / len(loop.plan.epoch_batches(state.epoch)),
        train_seconds=seconds,
        train_samples=state.examples_seen,
        best_checkpoint=state.best_checkpoint,
        best_score=state.best_checkpoint_score,
        stopped_early=loop.stopped_early,
        extra={"real_tokens": real_tokens, "padded_tokens": fed.tokens} | how,
        settle_saves=loop.checkpoints.close,
        model_flops=flop_rates(model, tasks.get(loop.job.config.task).token_level).flops(fed),
    )
