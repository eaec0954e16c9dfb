#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by start-local-cluster.sh.
#
# Usage: scripts/slurm/stop-local-cluster.sh [STATE_DIR]      (default: /tmp/emlab-slurm)
#
# Cancels the cluster's jobs, then stops slurmd, slurmctld and munged by the PIDs recorded in
# STATE_DIR, never by name: other SLURM or munge daemons may run on the same machine.
# Idempotent: daemons that are not running are skipped. STATE_DIR (logs included) is kept.
set -euo pipefail

STATE=${1:-/tmp/emlab-slurm}
say() { echo "stop-local-cluster: $*" >&2; }

daemon_pid() {
    # Prints the recorded PID if that process is still the named daemon (see start script).
    local name=$1 pidfile=$STATE/pids/$1.pid pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]] || return 1
    echo "$pid"
}

stop_daemon() {
    local name=$1 pid
    if pid=$(daemon_pid "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 15))
        while [[ -e /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.2; done
        if [[ -e /proc/$pid ]]; then
            say "$name (pid $pid) ignored SIGTERM for 15s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/pids/$name.pid"
}

# Cancel jobs while slurmctld and slurmd still run, so slurmd's job step processes end too.
if daemon_pid slurmctld >/dev/null && [[ -f $STATE/etc/slurm.conf ]]; then
    export SLURM_CONF=$STATE/etc/slurm.conf
    jobs=$(squeue -h -t pending,running,suspended,completing -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while [[ -n $(squeue -h -t pending,running,suspended,completing -o %A 2>/dev/null) ]] \
            && ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi
fi

for d in slurmd slurmctld munged; do stop_daemon "$d"; done
