"""The search's bookkeeping per trial on each storage: the journal file (default) vs a PostgreSQL server.

The same small search runs once per storage, as the real command line (experiments/cola.py --search), with the
same workers, space, seed and data; the number compared is the search's own accounting of its bookkeeping
(search/overhead.md's "study bookkeeping" line: the study lock, the dead-worker and heartbeat checks, counting
slots, ask, tell, the sampler), summed over the workers and divided by the trials. The heartbeat itself runs in
a thread beside training and is not in it. What it prints and the commands: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "experiments" / "cola.py"
START_POSTGRES = REPO_ROOT / "tests" / "postgres" / "start_local_postgres.sh"
STUDY = "storage-overhead"
SPACE = """method: random
metric: {name: eval/matthews_correlation, goal: maximize}
parameters:
  learning_rate: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-4}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="Checkpoint directory or Hub id.")
    parser.add_argument("--cola_source", default=os.environ.get("COLA_ZIP"), help="CoLA zip (default: $COLA_ZIP).")
    parser.add_argument("--n_trials", type=int, default=12, help="Trials per storage.")
    parser.add_argument("--workers", type=int, default=1, help="Search workers at once on each storage.")
    parser.add_argument("--max_train_samples", type=int, default=256, help="Training sentences per trial.")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument(
        "--postgres",
        help="A PostgreSQL server's superuser URL; a fresh database is created in it and dropped after. "
        "Default: the local test server of tests/postgres/start_local_postgres.sh (started if needed).",
    )
    parser.add_argument("--output", type=Path, help="Write the measurements as JSON here too.")
    return parser


def fresh_database(server_url: str) -> tuple[str, str]:
    """A database and its owner with a random password in `server_url`'s server: (SQLAlchemy URL, name)."""
    import psycopg

    name = f"cola_bench_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        admin.execute(f"CREATE DATABASE {name} OWNER {name}")
    server = urlsplit(server_url)
    return f"postgresql+psycopg://{name}:{password}@{server.hostname}:{server.port}/{name}", name


def drop_database(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"DROP ROLE IF EXISTS {name}")


def run_search(args: argparse.Namespace, space: Path, output_dir: Path, storage: str | None) -> float:
    """`--workers` workers of one search at once, to the end; their wall time."""
    command = [
        sys.executable, str(SCRIPT), "--model_name_or_path", args.model_name_or_path,
        "--cola_source", args.cola_source, "--search", str(space), "--n_trials", str(args.n_trials),
        "--num_train_epochs", str(args.num_train_epochs), "--max_train_samples", str(args.max_train_samples),
        "--experiment_name", STUDY, "--output_dir", str(output_dir), "--annotations_source", "none",
        "--report_to", "none", "--disable_tqdm", "true", "--search_pruner", "none",
    ]  # fmt: skip
    if storage:
        command += ["--search_storage", storage]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    workers = [
        subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(args.workers)
    ]
    for worker in workers:
        _, err = worker.communicate()
        if worker.returncode != 0:
            raise SystemExit(f"search on {storage or 'the journal'} failed (exit {worker.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - started


def journal(output_dir: Path):
    import optuna

    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(output_dir / "search" / "study.journal"))
    )


def bookkeeping(storage) -> dict:
    """The study's own accounting: every worker's bookkeeping seconds (user attrs), its trials."""
    import optuna

    study = optuna.load_study(study_name=STUDY, storage=storage)
    workers = [value for key, value in study.user_attrs.items() if key.startswith("worker_time_s:")]
    trials = study.get_trials(deepcopy=False)
    seconds = sum(worker["bookkeeping_s"] for worker in workers)
    epochs_s = sum(trial.user_attrs.get("epochs_s") or 0.0 for trial in trials)
    return {
        "trials": len(trials),
        "states": sorted({trial.state.name for trial in trials}),
        "workers": len(workers),
        "bookkeeping_s": seconds,
        "bookkeeping_per_trial_s": seconds / max(1, len(trials)),
        "epochs_s": epochs_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.cola_source:
        raise SystemExit("--cola_source (or $COLA_ZIP) is required")
    server = args.postgres
    if server is None:
        started = subprocess.run(["bash", str(START_POSTGRES)], capture_output=True, text=True, check=True)
        server = started.stdout.strip().splitlines()[-1]
    database_url, database = fresh_database(server)
    measured: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cola-storage-bench-") as scratch:
            space = Path(scratch) / "space.yaml"
            space.write_text(SPACE)
            for name, storage in (("journal file", None), ("PostgreSQL", database_url)):
                output_dir = Path(scratch) / name.split()[0].lower()
                wall_s = run_search(args, space, output_dir, storage)
                measured[name] = {"wall_s": wall_s, **bookkeeping(storage or journal(output_dir))}
    finally:
        drop_database(server, database)

    print(f"{'storage':<14}{'trials':>8}{'workers':>9}{'bookkeeping (s)':>17}{'per trial (s)':>15}{'epochs (s)':>12}")
    for name, row in measured.items():
        print(
            f"{name:<14}{row['trials']:>8}{row['workers']:>9}{row['bookkeeping_s']:>17.3f}"
            f"{row['bookkeeping_per_trial_s']:>15.4f}{row['epochs_s']:>12.1f}"
        )
    if args.output:
        report = {
            "command": [sys.executable, *sys.argv],
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
            "settings": {key: value for key, value in vars(args).items() if key not in ("postgres", "output")},
            "storages": measured,
        }
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
