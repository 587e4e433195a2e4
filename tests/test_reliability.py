"""Reliability through the real CLI: bad input, kill and resume, secrets, collapse and divergence, a failing Hub.

Every run here is `experiments/cola.py` in a subprocess, offline, on a tiny random BERT and synthetic TSVs; most bad
inputs, which stop before anything runs, go through the same `main` in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import error_line, synthetic_rows
from launching import SCRIPT, run_cola, run_here, run_process

from cola_hf.config import parse_args
from cola_hf.data.cola import RAW_FILES
from cola_hf.errors import UsageError
from cola_hf.integrations import hub
from cola_hf.run_files import FAILED_MARKER

FAST = ["--report_to", "none", "--disable_tqdm", "true"]


def assert_not_finished(output_dir: Path) -> None:
    """No results.json; where the run got as far as creating output_dir, the failure marker says why."""
    assert not (output_dir / "results.json").exists()
    if output_dir.exists():
        assert (output_dir / FAILED_MARKER).is_file()


# --- bad input: one line naming file and line, exit status 2, nothing that looks finished ----------------------
# A root process reads any file, whatever its mode. To make chmod 000 mean what it means for users, the run is
# started through this trampoline: it drops root's file-access capabilities, then execs the CLI.
WITHOUT_ROOT_FILE_ACCESS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
        sys.exit(f"cannot drop capability {capability}: errno {ctypes.get_errno()}")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def python_command(unreadable: bool) -> list[str]:
    if unreadable and os.geteuid() == 0:
        return [sys.executable, "-c", WITHOUT_ROOT_FILE_ACCESS]
    return [sys.executable]


def can_make_unreadable(directory: Path) -> bool:
    probe = directory / "probe.txt"
    probe.write_text("secret")
    probe.chmod(0)
    read = subprocess.run([*python_command(True), "-c", f"open({str(probe)!r}).read()"], capture_output=True)
    return read.returncode != 0 and b"PermissionError" in read.stderr


def copy_cola(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in RAW_FILES.values():
        (target / name).write_bytes((source / name).read_bytes())
    return target


def with_line(name: str, line: bytes):
    """A case's input builder: a copy of the CoLA files whose `name` has `line` as its third (after two good ones)."""

    def build(work: Path, cola: Path, model: Path) -> list:
        raw = copy_cola(cola, work / "raw")
        good = b"".join(("\t".join(map(str, row)) + "\n").encode() for row in synthetic_rows(2, seed=5))
        (raw / name).write_bytes(good + line)
        return ["--cola_source", raw]

    return build


def recipe(work: Path, text: str) -> Path:
    path = work / "recipe.yaml"
    path.write_text(text)
    return path


# id -> (build the input in `work` and return the CLI arguments before the common ones, the start of the error
# where {work} is the case's directory). Runs without a model argument use the tiny model.
BAD_INPUTS = {
    "missing-source": (
        lambda work, cola, model: ["--cola_source", work / "nowhere.zip"],
        r"{work}/nowhere\.zip: no such file or directory \(--cola_source\)",
    ),
    "unreadable-file": (
        lambda work, cola, model: ["--cola_source", copy_cola(cola, work / "raw")],
        r"{work}/raw/in_domain_dev\.tsv: cannot read \(Permission denied\)",
    ),
    "unreadable-directory": (
        lambda work, cola, model: ["--cola_source", copy_cola(cola, work / "raw")],
        r"{work}/raw: cannot list the directory \(Permission denied\)",
    ),
    "zip-without-the-dev-sets": (
        lambda work, cola, model: ["--cola_source", zip_with(work / "cola.zip", cola, "in_domain_train.tsv")],
        r"{work}/cola\.zip: expected in_domain_train\.tsv, in_domain_dev\.tsv, out_of_domain_dev\.tsv at its top "
        r"level, under cola_public/raw/ or under raw/; missing in_domain_dev\.tsv, out_of_domain_dev\.tsv",
    ),
    "wrong-column-count": (
        with_line("in_domain_train.tsv", b"gj04\t1\tHe left.\n"),
        r"{work}/raw/in_domain_train\.tsv:3: expected 4 tab-separated columns \(source, label, notes, sentence\), "
        r"found 3",
    ),
    "label-not-0-or-1": (
        with_line("in_domain_dev.tsv", b"gj04\t2\t\tHe left.\n"),
        r"{work}/raw/in_domain_dev\.tsv:3: label must be 0 or 1, found '2'",
    ),
    "empty-sentence": (
        with_line("out_of_domain_dev.tsv", b"gj04\t1\t\t  \r\n"),
        r"{work}/raw/out_of_domain_dev\.tsv:3: empty sentence",
    ),
    "not-utf8": (
        with_line("in_domain_train.tsv", b"gj04\t1\t\tHe l\xe9ft.\n"),
        r"{work}/raw/in_domain_train\.tsv:3: not UTF-8 \(byte 0xe9\)",
    ),
    "unknown-model-id-offline": (
        lambda work, cola, model: ["--cola_source", cola, "--model_name_or_path", "no-such-user/no-such-model"],
        r"model 'no-such-user/no-such-model': cannot load \(.*\); not a local directory, and HF_HUB_OFFLINE is set, "
        r"so only the Hub cache was searched",
    ),
    "missing-model-directory": (
        lambda work, cola, model: ["--cola_source", cola, "--model_name_or_path", work / "no-such-model"],
        r"model '{work}/no-such-model': no such directory \(--model_name_or_path\)",
    ),
    "directory-that-is-no-model": (
        lambda work, cola, model: ["--cola_source", cola, "--model_name_or_path", work],
        r"model '{work}': no config\.json in this directory; expected a checkpoint written by save_pretrained",
    ),
    "recipe-unknown-key": (
        lambda work, cola, model: [recipe(work, "learning_rate: 3.0e-5\nlerning_rate: 1\n"), "--cola_source", cola],
        r"{work}/recipe\.yaml: unknown option 'lerning_rate' \(see --help for the options\)",
    ),
    "recipe-wrong-type": (
        lambda work, cola, model: [recipe(work, "num_train_epochs: 2\nlearning_rate: fast\n"), "--cola_source", cola],
        r"{work}/recipe\.yaml: option 'learning_rate' expects a number, found 'fast'",
    ),
}
UNREADABLE = {"unreadable-file": "raw/in_domain_dev.tsv", "unreadable-directory": "raw"}
# Cases that need a process of their own: root's file access dropped, or the Hub offline from the first import on.
IN_A_SUBPROCESS = {*UNREADABLE, "unknown-model-id-offline"}


def zip_with(archive: Path, cola: Path, *names: str) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for name in names:
            handle.write(cola / name, f"cola_public/raw/{name}")
    return archive


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, cola_dir, tiny_model_dir) -> dict:
    """Every BAD_INPUTS case run once through the CLI, two at a time: id -> (work dir, completed process)."""
    root = tmp_path_factory.mktemp("bad-input")
    unreadable_possible = can_make_unreadable(root)
    commands = {}
    for case, (build, _) in BAD_INPUTS.items():
        if case in UNREADABLE and not unreadable_possible:
            continue
        work = root / case
        work.mkdir()
        args = [str(arg) for arg in build(work, cola_dir, tiny_model_dir)]
        if "--model_name_or_path" not in args:
            args += ["--model_name_or_path", str(tiny_model_dir)]
        if case in UNREADABLE:
            (work / UNREADABLE[case]).chmod(0)
        commands[case] = (work, [*args, "--output_dir", str(work / "out"), *FAST])

    def run_case(item):
        case, (work, argv) = item
        command = [*python_command(case in UNREADABLE), str(SCRIPT), *argv]
        return case, (work, run_process(command))

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(pool.map(run_case, [item for item in commands.items() if item[0] in IN_A_SUBPROCESS]))
    runs |= {case: (work, run_here(*argv)) for case, (work, argv) in commands.items() if case not in IN_A_SUBPROCESS}
    for case, path in UNREADABLE.items():
        if case in runs:
            (root / case / path).chmod(0o755)  # so that pytest can clean up
    return runs


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_line_with_status_2(bad_input_runs, case):
    if case not in bad_input_runs:
        pytest.skip("cannot make a file unreadable here (root without a way to drop CAP_DAC_OVERRIDE)")
    work, result = bad_input_runs[case]
    line = error_line(result.stderr)
    assert re.match(BAD_INPUTS[case][1].format(work=re.escape(str(work))), line), line
    assert result.returncode == 2
    assert_not_finished(work / "out")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lerning_rate", "1e-3"], r"unrecognized arguments: --lerning_rate 1e-3 \(see --help\)"),
        (
            ["--num_train_epochs", "four"],
            r"argument --num_train_epochs/--num-train-epochs: invalid float value: 'four'",
        ),
        (["--num_train_epochs", "1", "2"], r"unrecognized arguments: 2"),
        (["--do_train", "maybe"], r"argument --do_train/--do-train: Truthy value expected: got maybe"),
        (["--eval_strategy", "sometimes"], r"sometimes is not a valid IntervalStrategy, please select one of"),
    ],
    ids=["unknown-flag", "flag-wrong-type", "one-value-flag-given-two", "bool-flag", "invalid-choice"],
)
def test_bad_flags_are_one_line_usage_errors(argv, message):
    # The same parse the CLI runs; a UsageError is what main() prints as one line with exit status 2.
    with pytest.raises(UsageError, match=message) as error:
        parse_args(argv)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_train_epochs: [1, 2]\n", r"option 'num_train_epochs' takes one value, found a list"),
        ("do_train: maybe\n", r"option 'do_train' expects true or false, found 'maybe'"),
        ("seed: 4.5\n", r"option 'seed' expects an integer, found '4\.5'"),
    ],
    ids=["list-for-one-value", "bool", "int"],
)
def test_recipe_values_are_checked_naming_the_recipe_and_the_key(tmp_path, text, message):
    with pytest.raises(UsageError, match=re.escape(str(tmp_path / "recipe.yaml")) + ": " + message):
        parse_args([str(recipe(tmp_path, text))])


def test_hub_token_flag_is_refused_even_without_push(tmp_path):
    # The Trainer pickles every argument into training_args.bin and W&B records argv: refuse it before any work.
    training_args = parse_args(["--hub_token", "hf_FAKEflag0123456789abcdefgh", "--output_dir", str(tmp_path)]).training
    with pytest.raises(UsageError, match="--hub_token: pass the Hub token through the HF_TOKEN environment variable"):
        hub.prepare_push(training_args)


# --- kill and resume -------------------------------------------------------------------------------------------
RESUME_RUN = ["--num_train_epochs", "3", "--learning_rate", "1e-2", "--global_train_batch_size", "16", *FAST]


@pytest.fixture(scope="module")
def resume_data(cola_dir) -> Path:
    return cola_dir  # 180 training sentences in batches of 16: 12 steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, resume_data, tiny_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cola("--model_name_or_path", tiny_model_dir, "--cola_source", resume_data, "--output_dir", output_dir,
                      *RESUME_RUN, in_process=True)  # fmt: skip
    return output_dir, result


@pytest.mark.xdist_group("reliability-resume")  # its fixtures are its own
def test_a_checkpoint_continues_only_under_the_options_it_was_trained_with(
    tmp_path, resume_data, tiny_model_dir, uninterrupted
):
    """Killed after training, before the test sets: a command with another learning rate or seed is refused
    (the Trainer would restore the old optimizer and schedule and record the new values); the same one goes on."""
    reference, _ = uninterrupted
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    (output_dir / "results.json").unlink()
    (checkpoint,) = output_dir.glob("checkpoint-*")
    command = ["--model_name_or_path", tiny_model_dir, "--cola_source", resume_data, "--output_dir", output_dir,
               *RESUME_RUN]  # fmt: skip

    changed = run_here(*command, "--learning_rate", "5e-3", "--seed", "7")  # refusals: in this process
    assert changed.returncode == 2
    line = error_line(changed.stderr)
    assert "seed 42 there, 7 now" in line and "learning_rate 0.01 there, 0.005 now" in line
    assert checkpoint.is_dir() and not (output_dir / "results.json").exists()
    # The same global batch in another layout would draw other dropout masks: refused too (another number of processes:
    # see test_fault_injection's 2-process chain).
    other_layout = run_here(*command, "--per_device_train_batch_size", "8")
    assert other_layout.returncode == 2
    assert error_line(other_layout.stderr) == (
        f"{checkpoint}: saved with a per-device batch of 16, and this run's is 8; dropout masks are "
        "drawn per micro-batch, so it continues exactly only with the same: pass --per_device_train_batch_size 16, "
        "or --overwrite_output_dir to start over"
    )

    same = run_cola(*command, in_process=True)
    assert f"continuing from {checkpoint.name}" in same.stderr
    expected = json.loads((reference / "results.json").read_text())
    assert json.loads((output_dir / "results.json").read_text())["test"] == expected["test"]


# --- secrets, and the Hub failing after training ---------------------------------------------------------------
HF_TOKEN = "hf_FAKEplanted0123456789abcdefXYZ"
WANDB_API_KEY = "FAKEwandb0123456789abcdef0123456789abcdef"


class HubThatRefusesUploads(BaseHTTPRequestHandler):
    """A Hub stand-in over real HTTP: repositories can be created, every upload is refused (403)."""

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.command == "POST" and self.path == "/api/repos/create":
            host, port = self.server.server_address
            status, body = 200, {"url": f"http://{host}:{port}/someone/cola-tiny", "name": "someone/cola-tiny"}
        else:
            status, body = 403, {"error": "uploads are refused by this stand-in"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def refusing_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubThatRefusesUploads)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def test_failed_upload_keeps_local_outputs_and_no_secret_leaks(tmp_path, cola_dir, tiny_model_dir, refusing_hub):
    output_dir = tmp_path / "run"
    secrets = {
        "HF_TOKEN": HF_TOKEN,
        "WANDB_API_KEY": WANDB_API_KEY,
        "WANDB_MODE": "offline",  # W&B writes its run files into output_dir/wandb: searched too
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": refusing_hub,
    }
    result = run_cola(
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir,
        "--num_train_epochs", "1", "--report_to", "wandb", "--disable_tqdm", "true",
        "--push_to_hub", "true", "--hub_model_id", "someone/cola-tiny",
        env=secrets, check=False,
    )  # fmt: skip

    line = error_line(result.stderr)
    assert result.returncode == 1
    assert f"{output_dir} was not uploaded to the Hub repository someone/cola-tiny" in line
    assert "the local outputs are complete, retry with: hf upload someone/cola-tiny" in line
    assert (output_dir / "results.json").is_file() and not (output_dir / FAILED_MARKER).exists()
    assert list((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B did record the run

    files = [path for path in output_dir.rglob("*") if path.is_file()]
    assert len(files) > 20
    for secret in (HF_TOKEN, WANDB_API_KEY):
        assert secret not in result.stdout + result.stderr
        assert [path for path in files if secret.encode() in path.read_bytes()] == []


# --- numerical safety ------------------------------------------------------------------------------------------
def test_collapse_is_warned_about_and_recorded(tmp_path, cola_dir, tiny_model_dir):
    # Learning rate 1 keeps the loss finite on the tiny model (5 to 10) but predicts one class for every sentence.
    output_dir = tmp_path / "run"
    result = run_cola(
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir,
        "--num_train_epochs", "2", "--learning_rate", "1", *FAST, in_process=True,
    )  # fmt: skip
    warnings = re.findall(
        r"Collapsed classifier at epoch (\d+): all 20 validation sentences predicted (\w+)", result.stderr
    )
    assert warnings, result.stderr[-3000:]
    assert "--learning_rate" in result.stderr.split("Collapsed classifier at epoch")[1].splitlines()[0]
    epochs = json.loads((output_dir / "results.json").read_text())["epochs"]
    assert [str(row["epoch"]) for row in epochs if row["collapsed"]] == [epoch for epoch, _ in warnings]
    for epoch, label in warnings:
        row = epochs[int(epoch) - 1]
        assert row["valid_mcc"] == 0
        other = "unacceptable" if label == "acceptable" else "acceptable"
        assert (row[f"valid_predicted_{label}"], row[f"valid_predicted_{other}"]) == (20, 0)


def test_divergence_stops_the_run_naming_the_step(tmp_path, cola_dir, tiny_model_dir):
    output_dir = tmp_path / "run"
    result = run_cola(
        "--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir,
        "--num_train_epochs", "2", "--learning_rate", "1e6", *FAST, check=False, in_process=True,
    )  # fmt: skip
    line = error_line(result.stderr)
    assert result.returncode == 1
    assert re.match(r"training loss became NaN or infinite at step \d+; try a lower --learning_rate", line)
    assert (output_dir / FAILED_MARKER).read_text().strip() == line
    assert not (output_dir / "results.json").exists()
