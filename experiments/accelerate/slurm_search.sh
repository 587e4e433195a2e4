#!/bin/bash
# A hyperparameter search spread over a Slurm job array: one search worker per array task, one GPU each, all
# of them on one Optuna study (docs/cluster.md, "A search on a cluster"):
#
#   sbatch --array=0-3 experiments/accelerate/slurm_search.sh experiments/recipes/tutorial.yaml \
#       --search experiments/sweeps/wide.yaml --n_trials 16 --output_dir outputs/search
#
# Everything after the script name goes to experiments/cola.py, the same for every task. The workers share
# the study through its storage: by default the journal file in OUTPUT_DIR/search, which needs OUTPUT_DIR on
# a file system every node sees; or a database server, `--search_storage postgresql://user@host/db` (the
# password from PGPASSWORD or ~/.pgpass, never in the URL). --n_trials is the study's total: the tasks
# together run exactly that many trials, whichever task takes which; a task with no trial left waits for
# the trials still running (it reruns one whose worker dies), then the one that ends the study writes best/.
# Leave --overwrite_output_dir out: every task (and every restart of one) would start the study over.
#
# Preemption and the time limit (as in slurm.sh, whose approach this is):
#   - 300 s before the time limit Slurm sends SIGTERM to this batch shell (--signal=B:TERM@300), which passes
#     it to the worker (scancel --signal=TERM: every process of this task's steps). The worker stops its
#     trial at the next step, records it as failed and queues it again with the same parameters (a trial
#     starts over: its epoch checkpoints hold weights, not the optimizer), and exits 75; this script then
#     requeues its task (scontrol requeue), and the requeued task joins the study again: it, or any other
#     worker, runs the queued trial.
#   - On preemption Slurm sends SIGTERM to the task's steps at once and, with PreemptMode=REQUEUE, requeues
#     the task itself; the worker stops the same way.
#   - A worker killed outright (SIGKILL, a node that dies) leaves its trial RUNNING: the others see it is gone
#     through its trial directory's lock (a shared OUTPUT_DIR) or Optuna's heartbeat (a database), fail it and
#     run it again.
# Every start of a task appends to its own log (%A: the array's job id, %a: the task's index).
#
# The worker runs in a job step (srun) as plain `python`, like slurm.sh: Slurm's preemption signal goes to
# job steps, and a search worker is one process (it refuses more). Several workers on one GPU (a small model):
# add `--ntasks=2` to sbatch, and srun starts two workers in the task, both on its GPU.
#
#SBATCH --job-name=cola-search
#SBATCH --array=0-3                  # 4 workers; `sbatch --array=0-K` sets K+1
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append           # a requeued task appends to its log instead of truncating it
#SBATCH --requeue                    # a task may be requeued (preemption, node failure, the time limit below)
#SBATCH --signal=B:TERM@300          # SIGTERM to this shell 300 s before the time limit

set -uo pipefail   # no -e: the worker's exit status is examined below

# Run from the repository root (sbatch copies the script elsewhere; SLURM_SUBMIT_DIR is where you ran it).
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
PYTHON="${PYTHON:-python}"
EXIT_STOPPED=75   # experiments/cola.py: stopped by SIGTERM; its trial is queued again; run again to go on
# This task, as Slurm names it: <array job id>_<index>. Not SLURM_JOB_ID: the array's last task to start runs
# under the array's own job id, and `scancel`/`scontrol requeue` on that id reach every task of the array.
task="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}_${SLURM_ARRAY_TASK_ID:-0}"
[[ -n "${SLURM_ARRAY_JOB_ID:-}" ]] || task="${SLURM_JOB_ID:-?}"  # submitted without --array: one worker
echo "cola-hf: search worker $task (job ${SLURM_JOB_ID:-?}) start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname) at $(date '+%F %T')"

# srun since Slurm 22.05 no longer takes --cpus-per-task from the allocation by itself.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

# The SIGTERM goes to the task's steps with scancel, NOT to srun (which does not pass a SIGTERM on to its
# tasks, and kills the step outright on a second one).
stop_requested=0
stop_worker() {
  if [[ $stop_requested -eq 0 ]]; then
    stop_requested=1
    echo "cola-hf: SIGTERM at $(date '+%F %T'); asking the search worker to stop its trial"
    # Bounded: while Slurm is itself ending or requeueing the task, scancel retries until it runs again.
    timeout 10 scancel --signal=TERM "$task"
  fi
}
trap stop_worker TERM

# Bash runs a trap only between commands, so the step runs in the background and the shell waits for it.
srun "$PYTHON" experiments/cola.py "$@" &
step_pid=$!
# A trapped signal interrupts `wait`; wait again until the step has really ended, then read its status.
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"
status=$?

if [[ $status -eq $EXIT_STOPPED || ($stop_requested -eq 1 && $status -ne 0) ]]; then
  # Requeue only a task Slurm is not ending itself (scancel, scontrol requeue: COMPLETING), as slurm.sh does.
  job_state="$(scontrol show job --oneliner "$task" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)"
  if [[ $job_state == RUNNING ]]; then
    echo "cola-hf: search worker stopped with exit status $status; requeueing task $task to go on"
    scontrol requeue "$task"
  else
    echo "cola-hf: search worker stopped with exit status $status; task $task is $job_state, not requeued here"
  fi
fi
exit "$status"
