#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the `slurm` test tier and for trying sweeps before a cluster:
#   launchers/local_slurm.sh start     install (Debian's slurm-wlm + munge, when missing), configure, start, wait idle
#   launchers/local_slurm.sh status    print the node's state; exit 0 when it accepts jobs
#   launchers/local_slurm.sh stop      stop slurmd, slurmctld and munged (the configuration stays)
# Idempotent: `start` on a running cluster only checks it. Needs root (apt-get, daemons). One node, one partition
# (`debug`), no accounting (sacct then fails; submitit's "Bypassing sacct error" warnings are expected).
# The set-up verified here is in ../shared/DESIGN.md ("Verified on this machine"): ~15 s from nothing.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
KEY=/etc/munge/munge.key
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
NODE=$(hostname -s)

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root (or install them: apt-get install slurm-wlm munge)"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get install -y -qq slurm-wlm munge >/dev/null; }
}

configure() {
    mkdir -p /etc/munge /etc/slurm "$STATE" "$SPOOL" "$LOGS" /run/munge
    if [ ! -s "$KEY" ]; then
        dd if=/dev/urandom bs=1 count=1024 of="$KEY" status=none
    fi
    chown munge:munge "$KEY" /etc/munge /run/munge 2>/dev/null || true
    chmod 400 "$KEY"
    # CPUs: what this process may use; RealMemory: 90% of the machine's, in MB (slurmd refuses more than it has).
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat > "$CONF.new" <<EOF
# Written by launchers/local_slurm.sh: one node ($NODE), one partition, no accounting.
ClusterName=expertchat-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MpiDefault=none
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
        mv "$CONF.new" "$CONF"
        RECONFIGURED=1
    else
        rm -f "$CONF.new"
    fi
}

running() { pgrep -x "$1" >/dev/null; }

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }

start() {
    if running slurmctld && running slurmd && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]] && [ -z "${RECONFIGURED:-}" ]; then
        say "already running: node $NODE $(node_state)"; return
    fi
    if [ -n "${RECONFIGURED:-}" ]; then stop_daemons; fi
    running munged || runuser -u munge -- munged --force 2>/dev/null || munged --force
    running slurmctld || slurmctld
    running slurmd || slurmd
    local state=""
    for _ in $(seq 1 60); do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc) say "running: node $NODE $state (sinfo, squeue, sbatch ready)"; return ;;
            down*|drain*|inval*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "the node did not become idle within 60 s (state '${state:-none}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

stop_daemons() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 20); do running slurmd || running slurmctld || break; sleep 0.5; done
}

case "${1:-}" in
    start) install; RECONFIGURED=; configure; start ;;
    stop) stop_daemons; pkill -x munged 2>/dev/null || true; say "stopped" ;;
    status)
        if running slurmctld && running slurmd && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; then
            say "running: node $NODE $(node_state)"; sinfo; exit 0
        fi
        say "not running (start it: launchers/local_slurm.sh start)"; exit 1 ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
