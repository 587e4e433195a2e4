#!/bin/bash
# Multi-node fine-tuning under Slurm: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch experiments/accelerate/slurm_multinode.sh experiments/recipes/tutorial.yaml --output_dir outputs/ddp
#
# Everything after the script name goes to experiments/cola.py. Edit the #SBATCH lines for your cluster
# (nodes, GPUs per node, partition, time); the node count, GPU count, ranks and the main node's address
# come from Slurm, so experiments/accelerate/multi_node.yaml needs no editing for this script.
# Use another accelerate config (fsdp.yaml, deepspeed_zero2.yaml) with ACCELERATE_CONFIG=... sbatch ...
#
# Preemption and the time limit (docs/cluster.md): 300 s before the time limit Slurm sends SIGTERM to this
# batch shell (--signal=B:TERM@300), which passes it to every process of the job's steps on every node
# (scancel --signal=TERM). The ranks stop together at the next step, save checkpoint-<step>, and this
# script requeues the job; the requeued job runs the same command, which continues from that checkpoint.
# On preemption Slurm signals the job's steps at once, SIGKILLs them after the partition's GraceTime, and
# requeues the job itself (PreemptMode=REQUEUE); the ranks save the same way.
#
#SBATCH --job-name=cola-hf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # ONE task per node: accelerate launch itself starts a process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append           # a requeued job appends to its log instead of truncating it
#SBATCH --requeue                    # the job may be requeued (preemption, node failure, the time limit below)
#SBATCH --signal=B:TERM@300          # SIGTERM to this shell 300 s before the time limit: one step + one save

set -uo pipefail   # no -e: the launch's exit status is examined below

# Run from the repository root (sbatch copies the script elsewhere; SLURM_SUBMIT_DIR is where you ran it).
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1

ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-experiments/accelerate/multi_node.yaml}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
# The first node of the allocation hosts rank 0; every node connects to it. (sed, not head: head would
# close the pipe early and pipefail would kill the job on SIGPIPE.)
MAIN_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
# A port derived from the job id, so two jobs sharing a node don't collide.
MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# srun since Slurm 22.05 no longer takes --cpus-per-task from the allocation by itself.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
# torchrun passes a SIGTERM on to its workers and SIGKILLs them this many seconds later (its default is 30):
# give the save the whole lead time that --signal asked for.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
export MAIN_NODE MAIN_PORT GPUS_PER_NODE ACCELERATE_CONFIG
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"   # set 1 when the compute nodes have no internet
EXIT_STOPPED=75   # experiments/cola.py: stopped by SIGTERM after saving a checkpoint; run again to continue
echo "cola-hf: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) at $(date '+%F %T')"
echo "nodes=$SLURM_NNODES gpus/node=$GPUS_PER_NODE main=$MAIN_NODE:$MAIN_PORT config=$ACCELERATE_CONFIG"

# The signal goes to the job's steps with scancel, NOT to srun: srun does not pass a SIGTERM on to its
# tasks, and kills the step outright on the next one. Passed on once; on preemption Slurm signals the steps
# itself as well, and a rank treats a second SIGTERM as the first.
stop_requested=0
stop_training() {
  if [[ $stop_requested -eq 0 ]]; then
    stop_requested=1
    echo "cola-hf: SIGTERM at $(date '+%F %T'); asking every rank to save and stop"
    # Bounded: while Slurm is itself ending or requeueing the job, scancel retries until the job runs again,
    # and would then stop the next run.
    timeout 10 scancel --signal=TERM "$SLURM_JOB_ID"
  fi
}
trap stop_training TERM

# The single quotes matter: $SLURM_NODEID must be expanded by each node's own task (0, 1, ...), not here
# on the first node, or every node would claim machine_rank 0 and the rendezvous would hang.
srun --kill-on-bad-exit=1 bash -c '
  exec accelerate launch \
    --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_NODE" \
    --main_process_port "$MAIN_PORT" \
    experiments/cola.py "$@"
' cola-hf "$@" &
launch_pid=$!
# A trapped signal interrupts `wait`; wait again until the launch has really ended, then read its status.
while kill -0 "$launch_pid" 2>/dev/null; do wait "$launch_pid"; done
wait "$launch_pid"
status=$?

# torchrun reports a stop by signal as exit status 1, not the ranks' 75, hence the stop_requested check.
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
