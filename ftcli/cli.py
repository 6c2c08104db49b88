"""The command-line face: parse arguments, call one function, render the result. No logic here."""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, NoReturn, Optional

import typer

from ftcli.errors import FtcliError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Hugging Face Transformers models for text classification from a YAML experiment.",
)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML, or a run directory (its config.yaml).")]
RunArg = Annotated[Path, typer.Argument(help="A run directory written by `ftcli train`.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a key, e.g. --set training.learning_rate=3e-5.")
]
AdapterOpt = Annotated[
    bool, typer.Option("--adapter", help="Use the run's LoRA adapter on the base model instead of model/.")
]
class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = Annotated[
    Optional[Precision],
    typer.Option(help="Compute in this precision instead of the run's training.precision (fp32: exact probabilities)."),
]


def user_errors(command: Callable) -> Callable:
    """User mistakes end as one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ftcli.ui import print_error

        try:
            return command(*args, **kwargs)
        except FtcliError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


# What quiets the libraries' chatter and progress bars (ftcli reports what matters itself), read
# by each library when it is first imported: setting them costs nothing, importing the libraries
# to call their switches would cost seconds on commands that never use them.
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow the Hub's
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


@app.callback()
def _quiet_libraries() -> None:
    """Quiet the libraries' chatter and progress bars; one imported already (the CLI called
    in-process) is switched directly."""
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import logging as datasets_logging

        datasets_logging.set_verbosity_error()
        datasets_logging.disable_progress_bar()


def _load(config: Path, overrides: list[str] | None, backend: str | None = None, smoke: bool = False):
    from ftcli import config as schema

    extra = [f"backend={backend}"] if backend else []
    loaded = schema.resolve_paths(schema.load_config(config, (overrides or []) + extra))
    return schema.smoke(loaded) if smoke else loaded


@app.command("config")
@user_errors
def show_config(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved, validated config."""
    from ftcli.config import dump_config

    typer.echo(dump_config(_load(config, set_)), nl=False)


@app.command()
@user_errors
def prepare(config: ConfigArg, set_: SetOpt = None) -> None:
    """Load, check and tokenize the data into the on-disk cache; print a summary."""
    from ftcli.training.recipe import setup_data
    from ftcli.ui import console, prepare_summary

    _, _, prepared = setup_data(_load(config, set_))
    console.print(prepare_summary(prepared))


@app.command()
@user_errors
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    backend: Annotated[Optional[str], typer.Option(help="trainer or loop (overrides the config).")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="A few steps on a few examples: checks the whole path.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its newest checkpoint.")] = False,
    resume_from: Annotated[
        Optional[str], typer.Option("--resume-from", help="Continue the run from this checkpoint (path, name or step).")
    ] = None,
    resume_auto: Annotated[
        bool, typer.Option("--resume-auto", help="Continue the run if it has a checkpoint, else start it (job scripts).")
    ] = False,
    num_processes: Annotated[
        Optional[int],
        typer.Option("--num-processes", min=1, help="Train on N processes per machine (re-runs itself under accelerate launch)."),
    ] = None,
    accelerate_config: Annotated[
        Optional[Path], typer.Option("--accelerate-config", help="An accelerate config file for the launch.")
    ] = None,
    num_machines: Annotated[Optional[int], typer.Option("--num-machines", min=1, help="Machines training together.")] = None,
    machine_rank: Annotated[Optional[int], typer.Option("--machine-rank", min=0, help="This machine's rank (0: the main one).")] = None,
    main_process_ip: Annotated[Optional[str], typer.Option("--main-process-ip", help="Address of machine rank 0.")] = None,
    main_process_port: Annotated[Optional[int], typer.Option("--main-process-port", help="Port on machine rank 0.")] = None,
) -> None:
    """Fine-tune: prepare if needed, train, evaluate on validation, write the run directory."""
    from ftcli import launch

    machines = launch.Machines(accelerate_config, num_machines, machine_rank, main_process_ip, main_process_port)
    if machines.wanted(num_processes):  # before the training code's imports, which the launched processes make
        launch.relaunch(num_processes, sys.argv[1:], machines)
    from ftcli.commands.train import train_run
    from ftcli.runtime import Runtime
    from ftcli.ui import TrainingProgress, console, train_header, trained_view

    console.quiet = not launch.is_main_process()
    loaded = _load(config, set_, backend, smoke)
    runtime = Runtime.resolve(loaded.training.precision, distributed=True)
    console.print(train_header(loaded, runtime))
    how = "auto" if resume_auto else resume
    trained = train_run(loaded, overwrite, how, resume_from, events=TrainingProgress(show_result=True), runtime=runtime)
    console.print(trained_view(trained))


@app.command()
@user_errors
def distill(
    teacher: RunArg,
    student: Annotated[str, typer.Option("--student", help="The student: a model (as config.model takes) or layers:K (K of the teacher's layers).")],
    settings: Annotated[
        Optional[Path], typer.Option("--config", help="A YAML of what the student changes (training, distill, data.unlabeled, name).")
    ] = None,
    set_: SetOpt = None,
    max_drop: Annotated[
        Optional[float], typer.Option("--max-drop", min=0, help="The gate: the most the first metric may drop (default 0.01).")
    ] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="A few steps on a few examples: checks the whole path.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing student run.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the student run from its newest checkpoint.")] = False,
) -> None:
    """Train a smaller student on a teacher run's outputs and labels, then weigh it against the teacher."""
    from ftcli.commands.distill import distill_run
    from ftcli.ui import TrainingProgress, console, gate_view, trained_view

    distilled = distill_run(teacher, student, settings, set_, max_drop, smoke, overwrite, resume, TrainingProgress(show_result=True))
    console.print(trained_view(distilled.trained))
    console.print(gate_view(distilled.gate))


@app.command()
@user_errors
def evaluate(
    run_dir: RunArg,
    split: Annotated[str, typer.Option(help="Split to score: validation, test, train.")] = "validation",
    checkpoint: Annotated[Optional[str], typer.Option(help="A checkpoint folder or step instead of model/.")] = None,
    adapter: AdapterOpt = False,
    precision: PrecisionOpt = None,
) -> None:
    """Score a run's model on a split; print a table and write it as JSON."""
    from ftcli.commands.evaluate import evaluate_run
    from ftcli.ui import console, evaluation_view

    evaluation = evaluate_run(run_dir, split, checkpoint, adapter, precision and precision.value)
    console.print(evaluation_view(f"{run_dir}", split, evaluation))


@app.command()
@user_errors
def predict(
    run_dir: RunArg,
    input: Annotated[Optional[Path], typer.Option("--input", help="jsonl or csv with the text columns.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Where to write (.jsonl or .csv); stdout if absent.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Classify one text.")] = None,
    text_pair: Annotated[Optional[str], typer.Option("--text-pair", help="The second sentence of a pair.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="A checkpoint folder or step instead of model/.")] = None,
    adapter: AdapterOpt = False,
    precision: PrecisionOpt = None,
    engine: Annotated[
        str, typer.Option(help="auto (the ONNX export from ftcli export when current, else torch), torch or onnx.")
    ] = "auto",
) -> None:
    """Predict label names and probabilities for a file or an inline text."""
    from ftcli.commands.predict import predict as run_predict
    from ftcli.ui import error_console

    rows = run_predict(run_dir, input, text, text_pair, checkpoint, output, adapter, precision and precision.value, engine)
    if output is not None:
        error_console.print(f"{len(rows)} predictions written to {output}")


@app.command()
@user_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories written by `ftcli train`.")],
    html: Annotated[bool, typer.Option("--html", help="Also write one self-contained report.html.")] = False,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Folder for report.html and the comparison figure (default: the run, or the runs' parent)."),
    ] = None,
) -> None:
    """Metrics tables, learning curves (curves.png) and a diagnosis per run; compare several runs."""
    from ftcli.reporting.html import write_html
    from ftcli.reporting.report import build_report
    from ftcli.ui import console, report_view

    built = build_report(run_dirs, folder=out)
    if html:
        write_html(built)
    console.print(report_view(built))


@app.command()
@user_errors
def sweep(
    config: ConfigArg,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Finished trials the study should hold in all.")],
    storage: Annotated[
        Optional[str],
        typer.Option(help="Optuna storage URL: sqlite:///PATH (default: in output_dir/<name>-sweep/) or postgresql://... shared by workers."),
    ] = None,
    set_: SetOpt = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes on this machine sharing the study.")] = 1,
    retry_failed: Annotated[
        int, typer.Option("--retry-failed", min=0, help="Ask a dead worker's trial again up to K times, its run resumed.")
    ] = 0,
    heartbeat: Annotated[
        int, typer.Option("--heartbeat", min=1, help="Seconds between a worker's heartbeats; silent for twice this, it is taken for dead.")
    ] = 60,
) -> None:
    """Search the config's sweep: space with Optuna, one run per trial; continue the study when run again."""
    from ftcli.commands.sweep import Workers, run_sweep
    from ftcli.ui import TrainingProgress, console, sweep_table

    sharing = Workers(workers, retry_failed, heartbeat)
    result = run_sweep(_load(config, set_), trials, storage, events=TrainingProgress(), say=console.print, workers=sharing)
    console.print(sweep_table(result))
    console.print(f"trials: {result.folder / 'trials.csv'}  ({result.trials_run} run now, {len(result.rows)} in the study)")
    if result.best_config:
        console.print(f"best config: {result.best_config}")


@app.command()
@user_errors
def audit(
    config: ConfigArg,
    folds: Annotated[int, typer.Option("--folds", min=2, max=100, help="Cross-validation folds of the training split.")] = 5,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retrain every fold instead of keeping finished ones.")] = False,
    set_: SetOpt = None,
) -> None:
    """Cross-validate on the training split (one run per fold, resumable) and rank the training labels that are probably wrong."""
    from ftcli.commands.audit import run_audit
    from ftcli.ui import TrainingProgress, audit_view, console

    result = run_audit(_load(config, set_), folds, overwrite, events=TrainingProgress(), say=console.print)
    console.print(audit_view(result))


@app.command()
@user_errors
def push(
    run_dir: RunArg,
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, user/name (created if absent).")],
    public: Annotated[bool, typer.Option("--public", help="Create the repository public (default: private).")] = False,
) -> None:
    """Upload a run's model with a model card (config, metrics, curves) to the Hugging Face Hub."""
    from ftcli.commands.push import push_run
    from ftcli.ui import console

    console.print(f"pushed {run_dir} to {push_run(run_dir, repo_id, private=not public)}")


@app.command()
@user_errors
def export(
    run_dir: RunArg,
    format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    quantize: Annotated[
        Optional[str], typer.Option("--quantize", help="Also write an int8 model (dynamic quantization): int8.")
    ] = None,
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="Keep the int8 model only if the first metric drops by at most this (absolute).")
    ] = 0.005,
) -> None:
    """Export a run's model (ONNX into RUN/export/) and check its logits against PyTorch."""
    from ftcli.commands.export import export_run
    from ftcli.ui import console, error_console

    result = export_run(run_dir, format, quantize=quantize, max_drop=max_drop)
    console.print(
        f"exported {result.onnx_file}: on {result.examples} {result.split} examples its logits differ from "
        f"PyTorch's by at most {result.max_difference:.2e} (tolerance {result.atol:g})"
    )
    if result.quantized is not None:
        check = result.quantized
        line = (
            f"{check.metric} on {check.split}: fp32 {check.fp32:.4f}, int8 {check.int8:.4f} "
            f"(a drop of {check.drop:.4f}; at most {check.max_drop:g} allowed)"
        )
        if check.kept:
            console.print(f"kept {check.file} ({check.int8_bytes / 2**20:.1f} MiB, fp32 {check.fp32_bytes / 2**20:.1f} MiB): {line}")
        else:
            error_console.print(f"warning: int8 model not kept, only fp32 written: {line}", markup=False)
    console.print(f"report: {result.folder / 'report.json'}")


@app.command()
@user_errors
def serve(
    run_dir: RunArg,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    engine: Annotated[
        str, typer.Option(help="torch (the run's model/), onnx (RUN/export/, from ftcli export), or auto: torch on a GPU, the export on a CPU when it is current (int8 where kept), else torch.")
    ] = "auto",
    quantized: Annotated[bool, typer.Option("--quantized", help="With --engine onnx: serve export/model.int8.onnx.")] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Most inputs per forward pass.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Longest an input waits for others to join its batch (0: none; a batch is what queued while the model was busy).")
    ] = 0.0,
    max_batch_tokens: Annotated[
        int, typer.Option(min=1, help="Most padded tokens per forward pass (rows x padded length).")
    ] = 16_384,
    workers: Annotated[
        int, typer.Option(min=1, help="Server processes behind the one port, each with the model (the cores divided), its own queue and batches; /metrics adds them up.")
    ] = 1,
    max_queue: Annotated[
        Optional[int], typer.Option(min=1, help="Most inputs waiting, per worker process; beyond, 503 with Retry-After (default 16 batches).")
    ] = None,
    max_inputs: Annotated[int, typer.Option(min=1, help="Most inputs per request (413 beyond).")] = 256,
    max_chars: Annotated[int, typer.Option(min=1, help="Most characters per text (413 beyond).")] = 20_000,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay the torch engine's forward passes as CUDA graphs (captured at warm-up).")
    ] = True,
) -> None:
    """Serve a run's model over HTTP: /v1/predict, /v1/info, /v1/health, /metrics, and text-embeddings-inference's /predict, /info, /health. FTCLI_API_KEY set: Bearer auth."""
    from ftcli.commands.serve import ServeOptions, serve_run
    from ftcli.ui import console

    options = ServeOptions(
        str(run_dir), engine, quantized, max_batch, max_wait_ms, max_queue, workers, max_inputs, max_chars, max_batch_tokens,
        cuda_graphs,
    )
    serve_run(options, host, port, say=console.print)
    console.print("stopped: every request in flight was answered")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(prog_name="ftcli")
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: int | str | None) -> NoReturn:
    """End the process without the interpreter's teardown. After a command that imported torch and
    transformers, freeing their modules takes about a second (0.9 s on 2 CPU cores, bench/RESULTS.md)
    and serves nothing a finished command needs. Output is flushed and the atexit handlers (logging's,
    trackers') run first; while a thread that is not a daemon still runs, the ordinary exit waits for it."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    others = [thread for thread in threading.enumerate() if thread is not threading.main_thread()]
    if any(thread.is_alive() and not thread.daemon for thread in others):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter's own exit would run first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
