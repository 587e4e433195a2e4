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
#SBATCH --job-name=cola-hf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # ONE task per node: accelerate launch itself starts a process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

# Run from the repository root (sbatch copies the script elsewhere; SLURM_SUBMIT_DIR is where you ran it).
cd "${SLURM_SUBMIT_DIR:-.}"

ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-experiments/accelerate/multi_node.yaml}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
# The first node of the allocation hosts rank 0; every node connects to it. (sed, not head: head would
# close the pipe early and pipefail would kill the job on SIGPIPE.)
MAIN_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
# A port derived from the job id, so two jobs sharing a node don't collide.
MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

export MAIN_NODE MAIN_PORT GPUS_PER_NODE ACCELERATE_CONFIG
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"   # set 1 when the compute nodes have no internet
echo "nodes=$SLURM_NNODES gpus/node=$GPUS_PER_NODE main=$MAIN_NODE:$MAIN_PORT config=$ACCELERATE_CONFIG"

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
' cola-hf "$@"
