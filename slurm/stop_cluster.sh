#!/usr/bin/env bash
# Stop the single-node cluster started by slurm/local_cluster.sh: slurmd, slurmctld, munged.
# Running jobs are killed with slurmd. Configuration, munge key and state stay, so
# local_cluster.sh starts it again in a few seconds. Harmless when nothing is running.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    exec sudo -E bash "$0" "$@"
fi

# Each daemon is stopped through the pid file it wrote, SIGKILL after 10 s.
stop_pidfile() {
    local name=$1 pidfile=$2 pid i
    if [[ ! -s $pidfile ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "stop_cluster: $name not running"
        return 0
    fi
    pid=$(cat "$pidfile")
    kill "$pid"
    for ((i = 0; i < 50; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "stop_cluster: stopped $name (pid $pid)"
            return 0
        fi
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "stop_cluster: killed $name (pid $pid) after 10 s"
}

stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
