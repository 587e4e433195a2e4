#!/bin/bash
# Fine-tuning on ONE GPU under Slurm, surviving preemption and the time limit:
#
#   sbatch experiments/accelerate/slurm.sh experiments/recipes/tutorial.yaml --output_dir outputs/tutorial
#
# Everything after the script name goes to experiments/cola.py. Edit the #SBATCH lines for your cluster
# (partition, time, CPUs). What happens when Slurm wants the GPU back (docs/cluster.md):
#   - 300 s before the time limit Slurm sends SIGTERM to this batch shell (--signal=B:TERM@300), which passes
#     it to the training (scancel --signal=TERM: every process of the job's steps). Training stops at the next
#     step, saves checkpoint-<step> and exits 75; this script then requeues the job (scontrol requeue), and
#     the requeued job runs the same command, which continues from that checkpoint.
#   - On preemption Slurm sends SIGTERM to the job's steps at once, SIGKILL after the partition's GraceTime,
#     and with PreemptMode=REQUEUE requeues the job itself; the training saves the same way.
# Every start appends to the same log (--open-mode=append). A finished run (results.json) exits 0.
#
# The training runs in a job step (srun), because Slurm's preemption signal goes to job steps, not to the
# batch shell; and as plain `python`, not `accelerate launch`: with one process the two are the same run, but
# accelerate's one-process launcher dies on SIGTERM without passing it to the training process and reports
# the training's exit status 75 as 1. Mixed precision: add `--bf16 true` (or `--fp16 true`).
#
#SBATCH --job-name=cola-hf
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append           # a requeued job appends to its log instead of truncating it
#SBATCH --requeue                    # the job may be requeued (preemption, node failure, the time limit below)
#SBATCH --signal=B:TERM@300          # SIGTERM to this shell 300 s before the time limit: one step + one save

set -uo pipefail   # no -e: the training's exit status is examined below

# Run from the repository root (sbatch copies the script elsewhere; SLURM_SUBMIT_DIR is where you ran it).
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
PYTHON="${PYTHON:-python}"
EXIT_STOPPED=75   # experiments/cola.py: stopped by SIGTERM after saving a checkpoint; run again to continue
echo "cola-hf: job ${SLURM_JOB_ID:-?} start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname) at $(date '+%F %T')"

# srun since Slurm 22.05 no longer takes --cpus-per-task from the allocation by itself.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

# The SIGTERM goes to the job's steps with scancel, NOT to srun: srun does not pass a SIGTERM on to its
# tasks, and kills the step outright on the next one. Passed on once; on preemption Slurm signals the step
# itself as well, and the training treats a second SIGTERM as the first.
stop_requested=0
stop_training() {
  if [[ $stop_requested -eq 0 ]]; then
    stop_requested=1
    echo "cola-hf: SIGTERM at $(date '+%F %T'); asking the training to save and stop"
    # Bounded: while Slurm is itself ending or requeueing the job, scancel retries until the job runs again,
    # and would then stop the next run.
    timeout 10 scancel --signal=TERM "$SLURM_JOB_ID"
  fi
}
trap stop_training TERM

# Bash runs a trap only between commands, so the step runs in the background and the shell waits for it.
srun --kill-on-bad-exit=1 "$PYTHON" experiments/cola.py "$@" &
step_pid=$!
# A trapped signal interrupts `wait`; wait again until the step has really ended, then read its status.
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"
status=$?

if [[ $status -eq $EXIT_STOPPED || ($stop_requested -eq 1 && $status -ne 0) ]]; then
  # Requeue only a job Slurm is not ending itself: after `scancel <job>` or `scontrol requeue <job>` it is
  # COMPLETING, and a requeue here would undo the cancel. Running: the time-limit warning, or preemption
  # (Slurm signals the steps and requeues too, whichever comes first; the job is requeued once).
  job_state="$(scontrol show job --oneliner "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)"
  if [[ $job_state == RUNNING ]]; then
    echo "cola-hf: training stopped with exit status $status; requeueing job $SLURM_JOB_ID to continue"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "cola-hf: training stopped with exit status $status; job $SLURM_JOB_ID is $job_state, not requeued here"
  fi
fi
exit "$status"
