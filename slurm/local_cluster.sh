#!/usr/bin/env bash
# Set up and start a single-node SLURM cluster on this host (Debian/Ubuntu), for the tests in
# tests/test_slurm.py and for trying `sbatch slurm/cifar.sbatch` / `srun ...` locally.
#
#   sudo slurm/local_cluster.sh      # install if needed, configure, start, wait until the node is idle
#   sudo slurm/stop_cluster.sh       # stop the daemons again
#
# Idempotent: when the cluster is already up with the same configuration it only checks that
# and returns (well under a second). A changed slurm.conf restarts the SLURM daemons.
# Daemons are started directly (no systemd, which containers usually lack).
# Environment knobs: SLURM_WAIT_S (default 60) bounds the wait for the node to become ready.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    exec sudo -E bash "$0" "$@"
fi

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
WAIT_S=${SLURM_WAIT_S:-60}

log() { echo "local_cluster: $*"; }

die() {
    echo "local_cluster: ERROR: $*" >&2
    for f in "$CTLD_LOG" "$SLURMD_LOG"; do
        if [[ -f $f ]]; then
            echo "---- last lines of $f ----" >&2
            tail -n 25 "$f" >&2
        fi
    done
    exit 1
}

# True if the pid file names a live process (the daemons write their own pid files).
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
    local pidfile=$1 pid i
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

# --- 1. packages -------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

# --- 2. munge ----------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
if ! alive "$MUNGE_PID"; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
fi

# --- 3. slurm.conf -----------------------------------------------------------------------
HOST=$(hostname -s)
# nproc honours OMP_NUM_THREADS / OMP_THREAD_LIMIT, which must not shrink the node.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# Leave ~10% (at least 256 MB) for the OS: a RealMemory above what slurmd finds drains the node.
REAL_MEM=$((MEM_MB - (MEM_MB / 10 > 256 ? MEM_MB / 10 : 256)))
((REAL_MEM >= 256)) || REAL_MEM=256

NEW_CONF=$(cat <<EOF
# Written by slurm/local_cluster.sh: a single-node cluster for local tests. Re-run that script
# after editing; it rewrites this file when the host (name, CPUs, memory) changes.
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
# No cgroups in containers: track processes through /proc and do no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that went DOWN (e.g. slurmd restarted) comes back by itself once it registers again.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job or step is cancelled or runs out of time.
KillWait=5
# Trust the CPU count below even if slurmd detects a different topology (cpusets, VMs).
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)

CONF_CHANGED=0
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$NEW_CONF" ]]; then
    log "writing $CONF ($HOST: $CPUS CPUs, RealMemory=${REAL_MEM}M)"
    mkdir -p "$CONF_DIR"
    printf '%s\n' "$NEW_CONF" >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    CONF_CHANGED=1
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"

# --- 4. daemons --------------------------------------------------------------------------
if ((CONF_CHANGED)); then
    # Daemons still running with an older configuration: restart them with the new one.
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
fi
if ! alive "$CTLD_PID"; then
    log "starting slurmctld (log: $CTLD_LOG)"
    slurmctld || die "slurmctld failed to start"
fi
if ! alive "$SLURMD_PID"; then
    log "starting slurmd (log: $SLURMD_LOG)"
    slurmd || die "slurmd failed to start"
fi

# --- 5. wait until the node accepts jobs -------------------------------------------------
deadline=$((SECONDS + WAIT_S))
resumed=0
state=""
while :; do
    if scontrol ping >/dev/null 2>&1; then
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
        case $state in
            idle | mixed | allocated | completing)
                # slurmctld may report a state saved by an earlier run: also require our slurmd.
                alive "$SLURMD_PID" || die "slurmd is not running"
                log "ready: node $HOST is $state (partition debug, $CPUS CPUs)"
                exit 0
                ;;
            down* | drain*)
                # Left over from an earlier run (e.g. a killed slurmd); slurmd is up again now.
                if ((!resumed)) && alive "$SLURMD_PID"; then
                    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
    fi
    alive "$CTLD_PID" || die "slurmctld is not running"
    alive "$SLURMD_PID" || die "slurmd is not running"
    ((SECONDS < deadline)) || die "node $HOST not ready after ${WAIT_S}s (state: '${state:-no answer from slurmctld}'); reason: $(sinfo -h -n "$HOST" -o %E 2>/dev/null)"
    sleep 0.5
done
