"""Start-up guards: each command imports only what it uses. A fresh interpreter imports a
command's modules (or runs the command itself) and fails if a heavy module it does not need is
loaded: seconds on a laptop for every `ftcli config` or `ftcli predict`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Never needed to read a config, draw a report or answer --help.
FRAMEWORKS = {"torch", "transformers", "datasets", "accelerate", "sklearn", "scipy", "pandas"}
# Optional extras and heavy libraries that only some commands use.
EXTRAS = {"peft", "optuna", "onnx", "onnxruntime", "tensorboard", "wandb", "mlflow", "evaluate", "cleanlab", "fastapi", "uvicorn"}


def imported_by(*modules: str) -> set[str]:
    """The top-level packages loaded in a fresh interpreter after importing these modules."""
    code = "import sys\n" + "".join(f"import {module}\n" for module in modules)
    code += "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(done.stdout.split())


def imported_running(*args: str) -> set[str]:
    """The top-level packages a real `ftcli ARGS` process imports (python -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ftcli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split("|")[-1] for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {line.strip().split(".")[0] for line in lines[1:]}


def test_help_and_config_import_no_framework(make_experiment):
    experiment = make_experiment()
    for args in (["--help"], ["config", str(experiment)]):
        loaded = imported_running(*args)
        assert "ftcli" in loaded
        assert not loaded & (FRAMEWORKS | EXTRAS | {"matplotlib"}), (args, loaded & (FRAMEWORKS | EXTRAS | {"matplotlib"}))


def test_report_imports_no_framework():
    loaded = imported_by("ftcli.cli", "ftcli.reporting.report", "ftcli.reporting.html")
    assert "matplotlib" in loaded  # it draws the curves
    assert not loaded & (FRAMEWORKS | EXTRAS)


COMMANDS = {
    "predict": ("ftcli.commands.predict",),
    "evaluate": ("ftcli.commands.evaluate",),
    "export": ("ftcli.commands.export",),
    "train": ("ftcli.commands.train", "ftcli.training.loop"),
}
# Imported once before the commands' modules, each of which then imports in a process forked from
# that one: seconds of imports paid once, not per command. None of them is a module the commands
# must not load, so what each command adds is judged as in a fresh interpreter.
SHARED = ("ftcli.cli", "torch", "transformers.modeling_utils")
FORKED_IMPORTS = """
import json, os, sys, traceback
shared, commands = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for module in shared:
    __import__(module)
loaded = {}
for name, modules in commands.items():
    read, write = os.pipe()
    if os.fork() == 0:
        try:
            for module in modules:
                __import__(module)
            found = sorted({module.split(".")[0] for module in sys.modules})
        except BaseException:
            found = traceback.format_exc()
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        loaded[name] = json.loads(answer.read())
    os.wait()
print(json.dumps({"shared": sorted({module.split(".")[0] for module in sys.modules}), "commands": loaded}))
"""


@pytest.fixture(scope="module")
def imported_by_commands() -> dict:
    """What each command's modules load, after SHARED, each in its own forked interpreter."""
    code = [sys.executable, "-c", FORKED_IMPORTS, json.dumps(SHARED), json.dumps(COMMANDS)]
    done = subprocess.run(code, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_import_only_what_they_use(command, imported_by_commands):
    unused = EXTRAS | {"matplotlib", "sklearn"}
    assert not set(imported_by_commands["shared"]) & unused, "the shared imports load what a command must not"
    loaded = imported_by_commands["commands"][command]
    assert isinstance(loaded, list), loaded  # else the traceback of its import
    assert not set(loaded) & unused, set(loaded) & unused


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A run trained for two steps, that the predict commands below read."""
    from conftest import invoke, write_experiment

    folder = tmp_path_factory.mktemp("startup")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTCLI_CACHE", str(folder / "cache"))
        experiment = write_experiment(folder, tiny_model_dir, training={"max_steps": 2, "eval_every": 2, "save_every": 2})
        assert invoke("train", str(experiment)).exit_code == 0
    return folder / "runs" / "tiny"


def test_predict_with_torch_imports_no_datasets(trained_run):
    """The torch path tokenizes the rows without datasets (with pandas and pyarrow, 1.2-1.4 s of
    imports on 2 CPU cores), and imports no extra, sklearn or matplotlib."""
    loaded = imported_running("predict", str(trained_run), "--text", "a lovely film", "--engine", "torch")
    assert {"torch", "transformers", "tokenizers"} <= loaded
    unused = {"datasets", "pandas", "pyarrow", "sklearn", "matplotlib"} | EXTRAS
    assert not loaded & unused, loaded & unused


def test_predict_with_a_current_export_imports_no_framework(trained_run):
    """The ONNX path: onnxruntime and tokenizers, never torch or transformers (seconds to import)."""
    from conftest import invoke

    run = trained_run
    assert invoke("export", str(run)).exit_code == 0
    loaded = imported_running("predict", str(run), "--text", "a lovely film")
    assert {"onnxruntime", "tokenizers"} <= loaded
    unused = FRAMEWORKS | (EXTRAS - {"onnxruntime"}) | {"matplotlib"}
    assert not loaded & unused, loaded & unused


def test_train_shows_the_result_before_it_reads_the_curves(make_experiment, monkeypatch):
    """The metrics a user waits for are printed first; curves.png and the diagnosis come after."""
    from conftest import invoke

    from ftcli import ui
    from ftcli.commands import train as train_command

    happened = []
    read_curves, result_view = train_command.read_curves, ui.result_view

    def curves_read_after_result(run):
        happened.append(("curves", run.curves_png.exists()))
        return read_curves(run)

    def result_shown(outcome, metrics):
        happened.append(("result", sorted(metrics)))
        return result_view(outcome, metrics)

    monkeypatch.setattr(train_command, "read_curves", curves_read_after_result)
    monkeypatch.setattr(ui, "result_view", result_shown)
    result = invoke("train", str(make_experiment()))
    assert result.exit_code == 0, result.output
    assert happened == [("result", ["validation"]), ("curves", False)]
    output = result.output
    assert output.index("final metrics") < output.index("curves:") < output.index("run directory:")


def test_the_model_loads_while_the_splits_are_tokenized(make_experiment, monkeypatch, tmp_path):
    """setup starts loading the model once the label names are known, before tokenizing ends; the
    model is the one a sequential setup builds."""
    import threading

    import torch

    from ftcli.config import load_config
    from ftcli.data import prepare as prepare_module
    from ftcli.runtime import Runtime
    from ftcli.training import recipe

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cold-cache"))  # tokenized now, not read from a cache
    config = load_config(make_experiment())
    loading, overlapped = threading.Event(), []
    setup_model, tokenize_rows = recipe.setup_model, prepare_module.tokenize_rows

    def model_loading(*args):
        loading.set()
        return setup_model(*args)

    def tokenize_once_the_model_is_loading(*args):
        overlapped.append(loading.wait(timeout=20))
        return tokenize_rows(*args)

    monkeypatch.setattr(recipe, "setup_model", model_loading)
    monkeypatch.setattr(prepare_module, "tokenize_rows", tokenize_once_the_model_is_loading)
    _, prepared, _, model, _ = recipe.setup(config, Runtime.resolve("fp32"))
    assert overlapped and all(overlapped) and loading.is_set()
    torch.manual_seed(config.training.seed)
    expected, _ = setup_model(config, recipe.resolve_model_source(config.model), prepared.label_names, Runtime.resolve("fp32"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_a_command_ends_without_the_interpreters_teardown_yet_with_its_output_and_exit_handlers():
    """ftcli's entry point skips the second or so of freeing torch's and transformers' modules: no object
    is torn down, but what was printed arrives, atexit handlers run and the exit code holds; a
    thread still working is waited for, as an ordinary exit would."""
    code = (
        "import atexit, sys\n"
        "from ftcli.cli import exit_now\n"
        "class Torn:\n"
        "    def __del__(self): print('torn down')\n"
        "kept = Torn()\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "print('result', end=' ')\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "result handler ran\n")
    waits = (
        "import threading, time\n"
        "from ftcli.cli import exit_now\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished'))).start()\n"
        "exit_now(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", waits], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "thread finished\n")
