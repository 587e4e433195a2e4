"""Signal probe: a stand-in for experiments/cola.py that checks how SIGTERM travels through Slurm and launchers.

It "trains" for --steps steps of --step_seconds each, counting them in --state_dir, and follows the same
contract as the real script: a SIGTERM stops it at the next step boundary, it "saves" (sleeps --save_seconds),
prints one line and exits 75; started again it continues from the saved step; when done it writes
results.json and exits 0. Every process prints its pid, process group and every signal it receives, so a
log shows which processes a given Slurm mechanism reached and how often. Not used by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_STOPPED = 75


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state_dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step_seconds", type=float, default=1.0)
    parser.add_argument("--save_seconds", type=float, default=2.0)
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    job = os.environ.get("SLURM_JOB_ID", "-")
    who = f"probe {os.environ.get('PROBE_TAG', '')} rank {rank} pid {os.getpid()} pgid {os.getpgid(0)} job {job}"
    signals_received: list[str] = []

    def note_signal(signum: int, _frame) -> None:
        signals_received.append(signal.Signals(signum).name)
        print(f"{who}: got {signal.Signals(signum).name} (#{len(signals_received)})", flush=True)

    signal.signal(signal.SIGTERM, note_signal)
    signal.signal(signal.SIGUSR1, note_signal)

    args.state_dir.mkdir(parents=True, exist_ok=True)
    step_file = args.state_dir / f"step-rank{rank}"
    results = args.state_dir / "results.json"
    if results.exists():
        print(f"{who}: finished before; nothing to do", flush=True)
        return 0
    step = int(step_file.read_text()) if step_file.exists() else 0
    print(f"{who}: starting at step {step} of {args.steps}", flush=True)

    while step < args.steps:
        time.sleep(args.step_seconds)
        step += 1
        if "SIGTERM" in signals_received:
            time.sleep(args.save_seconds)
            step_file.write_text(str(step))
            print(f"{who}: stopped by SIGTERM at step {step} of {args.steps}; saved; exit {EXIT_STOPPED}", flush=True)
            return EXIT_STOPPED
    if rank == 0:
        results.write_text(json.dumps({"steps": step, "signals": signals_received}))
    print(f"{who}: finished {step} steps; exit 0", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
