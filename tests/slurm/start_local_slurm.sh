#!/bin/bash
# Start a one-node Slurm on this machine (controller and compute node on localhost), for trying the sbatch
# scripts in experiments/accelerate/ and for tests/test_slurm.py. Idempotent: run it again and it only
# restarts what is not answering. Needs root and Debian's packages:
#
#   apt-get install -y slurm-wlm munge
#   tests/slurm/start_local_slurm.sh          # prints `sinfo` once the node is idle
#   tests/slurm/start_local_slurm.sh stop     # stops slurmd, slurmctld and munged again
#
# A controller it starts begins empty (slurmctld -c): jobs saved by an earlier controller whose processes died
# with it (a machine stopped and started again, a container reused) would come back RUNNING and hold CPUs until
# their time limit, and the tests would find the node only half free.
#
# Two partitions, so preemption can be tried for real: jobs go to `batch` by default; a job submitted to
# `urgent` (higher PriorityTier) that needs the CPUs preempts them, and Slurm requeues the preempted job
# (PreemptMode=REQUEUE) after sending SIGTERM and waiting GraceTime seconds.
#
# Made for containers without systemd or a writable cgroup tree: the daemons run as root in the
# background, processes are tracked by walking /proc (proctrack/linuxproc) and tasks are not confined
# (task/none). That is fine for one trusted user on a test machine, not for a shared cluster.
set -euo pipefail

STATE_DIR="${SLURM_STATE_DIR:-/var/spool/cola-slurm}"
SLURM_CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
NODE="$(hostname -s)"
CPUS="${SLURM_NODE_CPUS:-$(nproc)}"
# Preempted jobs get this many seconds between SIGTERM and SIGKILL; at their time limit they get KillWait.
GRACE_SECONDS="${SLURM_GRACE_SECONDS:-60}"

running() {
  local pid
  pid="$(cat "$1" 2>/dev/null)" && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# Stops the daemons whose pid files are given, and waits until they are gone.
stop_daemons() {
  local pidfile
  for pidfile in "$@"; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")"
      while running "$pidfile"; do sleep 0.2; done
    fi
  done
}

if [[ "${1:-start}" == "stop" ]]; then
  stop_daemons "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid" /run/munge/munged.pid
  exit 0
fi

for program in munged slurmctld slurmd sinfo; do
  command -v "$program" >/dev/null || { echo "start_local_slurm: $program not found; apt-get install slurm-wlm munge" >&2; exit 1; }
done
[[ $EUID -eq 0 ]] || { echo "start_local_slurm: run as root (the daemons run as root here)" >&2; exit 1; }

mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/d" "$(dirname "$SLURM_CONF")"
REAL_MEMORY_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"

new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by tests/slurm/start_local_slurm.sh: one-node Slurm on localhost.
ClusterName=cola-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again; 10 keeps tests short.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
# A requeued job, once cred_expire has passed, waits for the next scheduling pass: every 60 s by default (the
# main loop) or 30 s (backfill), which left a requeued test job idle for up to a minute. A tiny cluster affords 2.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=$GRACE_SECONDS
MinJobAge=600
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$NODE CPUs=$CPUS RealMemory=$REAL_MEMORY_MB State=UNKNOWN
PartitionName=batch Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_SECONDS
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$SLURM_CONF"; then
  install -m 644 "$new_conf" "$SLURM_CONF"
  conf_changed=1
fi
rm -f "$new_conf"

# munge: the key comes with the Debian package; munged refuses to run as root, so it runs as user munge.
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! running /run/munge/munged.pid; then
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- munged
fi
munge -n | unmunge >/dev/null

if [[ $conf_changed -eq 1 ]]; then
  stop_daemons "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid"
fi
running "$STATE_DIR/slurmctld.pid" || slurmctld -c
running "$STATE_DIR/slurmd.pid" || slurmd

for _ in $(seq 60); do
  state="$(sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | sort -u | head -n1 || true)"
  case "$state" in
    idle | mixed | allocated) sinfo; exit 0 ;;
    down* | drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "start_local_slurm: node $NODE did not become idle; see $STATE_DIR/slurmctld.log and $STATE_DIR/slurmd.log" >&2
sinfo >&2 || true
exit 1
