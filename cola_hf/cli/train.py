"""The command line of a run: `python experiments/cola.py`, `cola-train`, and `cola_hf.train()` from Python.

    python experiments/cola.py [RECIPE.yaml] [--flags]     one run, --seeds (a seed study) or --search/--grid

`main(argv)` parses, dispatches and turns every error into one line and an exit status; `train(...)` is the same
for a notebook, returning the results.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna  # noqa: F401 (here, not only where a search uses it: see configure_logging)
import transformers

from cola_hf.config import RunOptions, parse_args
from cola_hf.errors import HubPushError, Refused, RunFailed, StoppedBySignal, UsageError, one_line
from cola_hf.integrations import hub
from cola_hf.redaction import install_on, redact_argv, redact_text
from cola_hf.run_files import ERROR_LOG
from cola_hf.training.output_dir import check_output_dir_path, is_finished, mark_failed

if TYPE_CHECKING:
    from cola_hf.results import RunResults

# When this process started (about): a failure another process of the run recorded after it is this run's.
STARTED = time.time()


def main(argv: list[str] | None = None) -> int:
    """`python experiments/cola.py [RECIPE.yaml] [--flags]`: exit 0, 1 (the run failed) or 2 (bad input)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    options = None
    try:
        options = parse_args(argv)
        if from_command_line:
            # Parsed: from here on the process's own command line is masked, for what records it (W&B's run
            # metadata, the model card): a password in --search_storage or a source URL stays in the options only.
            sys.argv[1:] = redact_argv(sys.argv[1:])
        configure_logging(options)
        hub.prepare_push(options.training)  # fails in one line before any work: no token, offline, bad repo id
        dispatch(options)
        close_process_group()
        return 0
    except HubPushError as err:  # the local run is complete: no RUN_FAILED marker
        print(f"cola: error: {redact_text(str(err))}", file=sys.stderr)
        return err.exit_code
    except StoppedBySignal as err:  # not a failure: the checkpoint is complete, the same command continues
        close_process_group()  # every process stopped at the same step
        if options is None or options.training.process_index == 0:  # one line for the run, not one per process
            print(f"cola: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except (UsageError, RunFailed) as err:
        if debug:
            raise
        if isinstance(err, Refused) and err.on_every_process:
            close_process_group()
        if not isinstance(err, Refused):  # a refused directory is not this run's: nothing written there
            if (output_dir := run_directory(options)) is not None:
                mark_failed(output_dir, redact_text(str(err)), run_started=STARTED)
            elif isinstance(err, RunFailed):
                mark_failed_by_this_process(options, redact_text(str(err)))
        print(f"cola: error: {redact_text(str(err))}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # nobody foresaw it: one line on the console, the traceback in a file
        if debug:
            raise
        output_dir = run_directory(options)
        log = Path(output_dir) / ERROR_LOG if output_dir else Path(tempfile.mkstemp(prefix="cola-error-")[1])
        log.write_text(redact_text(traceback.format_exc()), encoding="utf-8")
        message = redact_text(f"unexpected {one_line(err)}; the traceback is in {log} (--debug shows it here)")
        if output_dir is not None:
            mark_failed(output_dir, message, run_started=STARTED)
        else:
            mark_failed_by_this_process(options, message)
        print(f"cola: error: {message}", file=sys.stderr)
        return RunFailed.exit_code


def close_process_group() -> None:
    """Close the process group accelerate opened for a run on several processes, once every process is done with
    it. Left open to the interpreter's end, gloo's threads now and then abort a process that finished its run
    (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489), and the launcher then
    reports the run failed. Not after a failure, unless every process refused the run together: the other
    processes may be gone, or stuck in a collective."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def run_directory(options: RunOptions | None) -> str | None:
    """The run's output directory, where it exists, this process writes it and it holds no finished run (a later
    command's error is not that run's failure); else None."""
    args = options.training if options is not None else None
    if args is not None and args.should_save and Path(args.output_dir).is_dir() and not is_finished(args.output_dir):
        return args.output_dir
    return None


def mark_failed_by_this_process(options: RunOptions | None, message: str) -> None:
    """A failure of a process other than the main one, in a run of several: it leaves RUN_FAILED itself, naming
    itself (the main process only sees a peer leave, or is blocked in a collective and ended by the launcher)."""
    args = options.training if options is not None else None
    if args is not None and args.world_size > 1 and Path(args.output_dir).is_dir():
        mark_failed(args.output_dir, message, rank=args.process_index)


def train(recipe: str | Path | None = None, **options: Any) -> RunResults | dict | None:
    """Run from Python (a notebook, say) with the command line's options, e.g.

        results = train("experiments/recipes/tutorial.yaml", num_train_epochs=2, output_dir="outputs/ep2")
        results.test["out_of_domain_dev"].matthews_correlation

    Keyword arguments are the command line's flags (lists for options that take several values), parsed and
    checked the same way; bad ones raise `UsageError`. Returns the run's results (None on processes other
    than the main one); with `seeds`, `search` or `grid`, the study's summary instead.
    """
    argv = [str(recipe)] if recipe is not None else []
    for name, value in options.items():
        values = value if isinstance(value, list | tuple) else [value]
        argv += [f"--{name}", *map(str, values)]
    parsed = parse_args(argv)
    configure_logging(parsed)
    hub.prepare_push(parsed.training)
    return dispatch(parsed)


def dispatch(options: RunOptions) -> RunResults | dict | None:
    """One run, a seed study or a search (a grid is a search), as the study flags say."""
    check_output_dir_path(options.training.output_dir)
    study = options.study
    if study.seeds and study.grid:
        raise Refused("--seeds and --grid: give one or the other (a grid runs with --seed)")
    if study.search and (study.seeds or study.grid):
        raise Refused("--search with --seeds or --grid: give one (confirm a search's best_params.yaml over seeds)")
    # The run and the studies are imported here, not above: with datasets, the Trainer and evaluate they take
    # seconds to import, which --help and a refused option never need.
    from cola_hf.run import run
    from cola_hf.studies.search.worker import run_search
    from cola_hf.studies.seeds import run_options, run_seeds

    if study.search or study.grid:
        return run_search(options)
    if study.seeds:
        return run_seeds(options)
    if study.per_run_output_dir:
        options = run_options(options)
    return run(options)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged: a notebook or a test harness that replaces it
    between two runs would otherwise get the first run's, closed, stream."""

    @property
    def stream(self):  # noqa: ANN201 (StreamHandler's attribute)
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


def configure_logging(options: RunOptions) -> None:
    args = options.training
    # Our own progress lines on the main process; the libraries at the level TrainingArguments asks for.
    ours = logging.INFO if args.should_log else logging.WARNING
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler], level=ours, force=True)
    level = args.get_process_log_level()
    import datasets  # here: importing it takes most of a second, and --help and bad input do without

    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    # No password or token in any log line: every handler that writes ours or the libraries' masks them
    # (transformers and Optuna have handlers of their own, not the root's). Optuna makes its handler when it is
    # imported, which is why it is imported with this module (about 30 ms): imported later, inside a
    # search, its handler would be unmasked, and bound to whatever sys.stderr was then (a notebook cell's, a test's).
    install_on(logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("optuna"))
