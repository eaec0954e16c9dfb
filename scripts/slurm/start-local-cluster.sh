#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (node "localhost", partition "local", two fake
# GPUs) so the workflow's SLURM profile can be tested end to end without a real cluster.
#
# Usage: scripts/slurm/start-local-cluster.sh [STATE_DIR]      (default: /tmp/emlab-slurm)
#
# Needs root on Debian/Ubuntu; installs slurmctld, slurmd, slurm-client and munge with apt if
# they are missing. Config, keys, sockets, logs, spool and PID files all live under STATE_DIR.
# Afterwards point the SLURM clients at the cluster:  source STATE_DIR/env.sh
# Idempotent: when all daemons recorded in STATE_DIR are alive it only waits for the node.
# Environment: EMLAB_SLURMCTLD_PORT / EMLAB_SLURMD_PORT (default 16817 / 16818, away from
# SLURM's standard ports so a system SLURM on the same machine is left alone).
#
# Exit status: 0 cluster up; 3 this machine cannot host it (not root, no apt, apt unreachable);
# 1 any other failure (see STATE_DIR/log/).
set -euo pipefail

STATE=${1:-/tmp/emlab-slurm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CTLD_PORT=${EMLAB_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${EMLAB_SLURMD_PORT:-16818}
DAEMONS=(munged slurmctld slurmd)
DEF_MEM_PER_CPU=512

say() { echo "start-local-cluster: $*" >&2; }
fail() { say "$*"; exit 1; }
unsupported() { say "cannot host a local cluster here: $*"; exit 3; }

[[ $EUID -eq 0 ]] || unsupported "must run as root (slurmd starts jobs as their submitting user)"

install_packages() {
    local missing=0 bin
    for bin in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$bin" >/dev/null || missing=1
    done
    [[ $missing -eq 0 ]] && return 0
    command -v apt-get >/dev/null && [[ -f /etc/debian_version ]] \
        || unsupported "SLURM is not installed and this is not a Debian system with apt-get"
    say "installing slurmctld slurmd slurm-client munge with apt"
    # The packages' maintainer scripts would start system-wide daemons with /etc configs;
    # a temporary policy-rc.d forbids that (only if the machine has none of its own).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local pkgs=(slurmctld slurmd slurm-client munge) ok=0
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$STATE/log/apt.log" 2>&1; then
        ok=1
    elif apt-get update -q >>"$STATE/log/apt.log" 2>&1 \
        && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$STATE/log/apt.log" 2>&1; then
        ok=1
    fi
    [[ $made_policy -eq 1 ]] && rm -f "$policy"
    [[ $ok -eq 1 ]] || unsupported "apt-get could not install the packages (see $STATE/log/apt.log)"
}

# A PID file only counts while its process is alive and still the daemon we started:
# after a reboot or crash the number may belong to an unrelated process.
daemon_alive() {
    local name=$1 pidfile=$STATE/pids/$1.pid pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]]
}

start_daemon() {
    local name=$1
    shift
    # setsid: the daemon must outlive this script and not receive the caller's Ctrl-C;
    # its output goes to a file so callers reading our stdout do not wait for it to exit.
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    local pid=$! deadline=$((SECONDS + 10))
    echo "$pid" >"$STATE/pids/$name.pid"
    # Until the background shell has exec'd the daemon, the PID goes by another name.
    while [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") != "$name" ]] && ((SECONDS < deadline)); do
        sleep 0.05
    done
}

# wait_for DAEMON SECONDS WHAT CMD...: polls CMD until it succeeds; gives up when DAEMON dies
# (a port in use, a bad config) or after SECONDS.
wait_for() {
    local daemon=$1 seconds=$2 what=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        daemon_alive "$daemon" || fail "$daemon exited while waiting for $what: see $STATE/log/$daemon.out"
        ((SECONDS < deadline)) || fail "timed out after ${seconds}s waiting for $what (logs: $STATE/log/)"
        sleep 0.2
    done
}

node_idle() { [[ $(sinfo -h -n localhost -o %T 2>/dev/null) == idle ]]; }

write_config() {
    # CPU count and memory as slurmd itself detects them (CPUs doubled below). Leave 10% of the memory to
    # everything else.
    local detected cpus mem real_srun="" dir path_dirs
    detected=$(slurmd -C | head -n1)
    cpus=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$detected")
    mem=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
    [[ -n $cpus && -n $mem ]] || fail "could not read CPUs/RealMemory from 'slurmd -C': $detected"
    mem=$((mem * 9 / 10))
    # Twice the detected cores as CPU slots (slurm.conf's SlurmdParameters=config_overrides lets slurmd accept
    # more than it detects): the tests' jobs are light and a job held until its time limit by the fault tests
    # must not leave the GPU jobs a single slot between them on a 2-core machine.
    cpus=$((cpus * 2))
    sed -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@CPUS@|$cpus|g" -e "s|@REAL_MEMORY@|$mem|g" -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" \
        "$HERE/slurm.conf.in" >"$STATE/etc/slurm.conf"
    # slurmd reads gres.conf from the directory of slurm.conf.
    cp "$HERE/gres.conf.in" "$STATE/etc/gres.conf"
    # Snakemake's jobstep executor drops every SLURM_* variable, SLURM_CONF included, before it
    # calls srun inside a job, and srun would then look for /etc/slurm/slurm.conf. A wrapper
    # first on PATH (which the job inherits) points srun back at this cluster.
    IFS=: read -ra path_dirs <<<"$PATH"
    for dir in "${path_dirs[@]}"; do  # the real srun, not a wrapper from an earlier env.sh
        [[ $dir != "$STATE/bin" && -x $dir/srun ]] && { real_srun=$dir/srun; break; }
    done
    [[ -n $real_srun ]] || fail "srun not found on PATH"
    cat >"$STATE/bin/srun" <<WRAPPER
#!/bin/sh
SLURM_CONF=$STATE/etc/slurm.conf exec $real_srun "\$@"
WRAPPER
    chmod 755 "$STATE/bin/srun"
    printf 'export SLURM_CONF=%s\nexport PATH=%s:$PATH\n' "$STATE/etc/slurm.conf" "$STATE/bin" >"$STATE/env.sh"
}

mkdir -p "$STATE"/{bin,etc,pids,run,log,ctld,spool,munge}
# munged refuses a socket directory that other users can write to.
chmod 755 "$STATE/munge"
install_packages
export SLURM_CONF=$STATE/etc/slurm.conf

alive=0
for d in "${DAEMONS[@]}"; do daemon_alive "$d" && alive=$((alive + 1)); done
if ((alive == ${#DAEMONS[@]})); then
    say "already running (state dir $STATE)"
else
    # A partial cluster (one daemon died) is restarted as a whole, from a clean state.
    ((alive == 0)) || "$HERE/stop-local-cluster.sh" "$STATE"
    write_config
    if [[ ! -s $STATE/munge/munge.key ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    fi
    # --force: munged refuses a socket that other users cannot reach, as in a private (0700)
    # temp dir; this cluster's jobs and clients run as root, so that is no loss.
    start_daemon munged munged --foreground --force \
        --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/run/munged.pid" --seed-file="$STATE/munge/munged.seed" \
        --log-file="$STATE/log/munged.log"
    wait_for munged 20 "munged's socket" test -S "$STATE/munge/munge.socket"
    # -c: start without the job state of an earlier run; this cluster is throwaway.
    start_daemon slurmctld slurmctld -D -c -f "$SLURM_CONF"
    wait_for slurmctld 30 "slurmctld to answer" scontrol ping
    start_daemon slurmd slurmd -D -N localhost -f "$SLURM_CONF"
fi

wait_for slurmd 60 "node localhost to become idle" node_idle
for d in "${DAEMONS[@]}"; do daemon_alive "$d" || fail "$d exited during start-up: see $STATE/log/$d.out"; done
say "cluster up: $(sinfo -h -o '%P %D %T %G' | head -n1); use it with: source $STATE/env.sh"
