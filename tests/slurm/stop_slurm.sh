#!/usr/bin/env bash
# Stop the test SLURM started by start_slurm.sh STATE_DIR: cancel its jobs, then end exactly the
# daemons listed in STATE_DIR/pids (TERM, then KILL after 10 s). Safe to run twice.
#   tests/slurm/stop_slurm.sh STATE_DIR
set -uo pipefail

[[ $# -eq 1 ]] || { echo "usage: stop_slurm.sh STATE_DIR" >&2; exit 2; }
STATE=$1
PIDS=$STATE/pids
[[ -f $PIDS ]] || exit 0
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF=$STATE/slurm.conf

# A PID counts as ours only while its command line still names our state dir (or is the munged
# started with our socket): a recycled PID is never touched.
ours() {
    local cmd
    cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *"$STATE"* ]]
}

# Jobs first, so slurmd ends their slurmstepd processes itself.
if [[ -f $SLURM_CONF ]] && command -v scancel >/dev/null 2>&1; then
    timeout 10 scancel --full --quiet --partition="$(sed -n 's/^PartitionName=\([^ ]*\).*/\1/p' "$SLURM_CONF")" \
        >/dev/null 2>&1 || true
    for _ in $(seq 20); do
        [[ -z $(timeout 5 squeue -h -t running,pending,completing -o %i 2>/dev/null) ]] && break
        sleep 0.5
    done
fi

# slurmd, then slurmctld, then munged (reverse start order).
mapfile -t lines < <(tac "$PIDS")
for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    [[ -n ${pid:-} ]] || continue
    if ours "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do ours "$pid" || break; sleep 0.1; done
        if ours "$pid"; then
            echo "stop_slurm.sh: $name ($pid) ignored TERM, sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
done
: >"$PIDS"
rm -f "$PIDS"
exit 0
