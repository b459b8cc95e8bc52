#!/usr/bin/env bash
# Start a throw-away single-node SLURM (munged + slurmctld + slurmd) for tests/test_slurm.py.
#
#   tests/slurm/start_slurm.sh STATE_DIR      # then: source STATE_DIR/env.sh; sinfo; sbatch ...
#   tests/slurm/stop_slurm.sh  STATE_DIR      # kills exactly the PIDs listed in STATE_DIR/pids
#
# Everything lives in STATE_DIR (keep the path short: munge's socket path must fit in 108 bytes):
#   slurm.conf, gres.conf   configuration (clients find it through SLURM_CONF, see env.sh)
#   env.sh                  exports SLURM_CONF, PATH (STATE_DIR/bin first) and GEM3D_SLURM_PARTITION
#   bin/                    srun, sbatch, squeue, ... wrappers that set SLURM_CONF (see below)
#   pids                    "<name> <pid>" for each daemon this script started (munged, slurmctld, slurmd)
#   *.log                   daemon logs; dev/nvidia[01] fake GPU character devices (mknod)
#
# Needs root (slurmd runs jobs as the submitting user; the daemons run as root here). No systemd and no
# cgroups are needed: proctrack/linuxproc, task/none. No slurmdbd: `sacct` does not work, `squeue`
# keeps finished jobs for MinJobAge=600 s, which is what snakemake-executor-plugin-slurm's
# `slurm-status-command: squeue` relies on.
#
# Missing Debian packages (slurmctld slurmd slurm-client munge) are installed with apt-get unless
# GEM3D_SLURM_NO_INSTALL=1. Ports: GEM3D_SLURM_CTLD_PORT (default 6817), GEM3D_SLURM_D_PORT (6818).
#
# Exit status: 0 = running; 77 = cannot run here (not root, packages missing and not installable, no mknod):
# the caller may skip; anything else = a real failure (see the logs in STATE_DIR).
set -euo pipefail

SKIP=77
die() { echo "start_slurm.sh: $*" >&2; exit 1; }
skip() { echo "start_slurm.sh: SKIP: $*" >&2; exit "$SKIP"; }

[[ $# -eq 1 ]] || die "usage: start_slurm.sh STATE_DIR"
STATE=$1
PARTITION=${GEM3D_SLURM_PARTITION:-gem3dtest}
NODE=localhost
CTLD_PORT=${GEM3D_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${GEM3D_SLURM_D_PORT:-6818}
N_GPUS=2

[[ $EUID -eq 0 ]] || skip "needs root (slurmd and munged run as root in this test set-up)"

# ---------------------------------------------------------------- packages
export PATH="$PATH:/usr/sbin:/sbin"
missing() {
    local c
    for c in munged mungekey slurmctld slurmd sbatch squeue scontrol sinfo; do
        command -v "$c" >/dev/null 2>&1 || return 0
    done
    return 1
}
if missing; then
    [[ ${GEM3D_SLURM_NO_INSTALL:-0} == 1 ]] && skip "slurm/munge not installed and GEM3D_SLURM_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || skip "slurm/munge not installed and no apt-get here"
    echo "start_slurm.sh: installing slurmctld slurmd slurm-client munge with apt-get" >&2
    # Keep the packages' init scripts from starting system daemons with the default config.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && created_policy=1
    fi
    apt_install() {
        DEBIAN_FRONTEND=noninteractive timeout 240 apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge >>"$APT_LOG" 2>&1
    }
    APT_LOG=$(mktemp --suffix=.log /tmp/gem3d-slurm-apt.XXXXXX)
    ok=0
    apt_install && ok=1 || { timeout 120 apt-get update -q >>"$APT_LOG" 2>&1 && apt_install && ok=1; } || true
    [[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $ok == 1 ]] || skip "apt-get could not install the slurm packages (log: $APT_LOG)"
    rm -f "$APT_LOG"
    missing && die "packages installed but commands still missing"
fi

# ---------------------------------------------------------------- state dir, config
mkdir -p "$STATE"
chmod 700 "$STATE"
STATE=$(cd "$STATE" && pwd)
[[ ! -s $STATE/pids ]] || die "$STATE/pids exists: stop that SLURM first (stop_slurm.sh $STATE)"
mkdir -p "$STATE/munge" "$STATE/ctld" "$STATE/spool" "$STATE/dev"
chmod 700 "$STATE/munge"
SOCKET=$STATE/munge/munge.socket
(( ${#SOCKET} < 100 )) || die "state dir path too long for munge's socket: $SOCKET"
: >"$STATE/pids"

HOST=$(hostname -s 2>/dev/null || hostname)
# Real CPUs / memory of this machine (slurmd -C); at least 4 CPUs are configured so rules with a few
# threads still fit on a 2-core CI machine (SlurmdParameters=config_overrides: no hardware check).
NODECONF=$(slurmd -C 2>/dev/null | head -1 || true)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODECONF")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODECONF")
[[ -n $CPUS ]] || CPUS=$(nproc)
[[ -n $MEM ]] || MEM=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
(( CPUS >= 4 )) || CPUS=4
MEM=$(( MEM * 9 / 10 ))

# Fake GPUs: character devices with NVIDIA's major number 195, so `--gpus=1` is accepted and
# slurmd sets CUDA_VISIBLE_DEVICES for the job, on a node without a GPU.
for ((i = 0; i < N_GPUS; i++)); do
    rm -f "$STATE/dev/nvidia$i"
    mknod "$STATE/dev/nvidia$i" c 195 "$i" 2>/dev/null || skip "mknod is not allowed here (fake GPU devices)"
done

cat >"$STATE/slurm.conf" <<EOF
# Written by tests/slurm/start_slurm.sh: single-node test cluster, nothing here is for production.
ClusterName=gem3dtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MailProg=/bin/true
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS RealMemory=$MEM Gres=gpu:$N_GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$STATE/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=$STATE/dev/nvidia[0-$((N_GPUS - 1))]
EOF

# Client wrappers that pin SLURM_CONF. They matter inside jobs: snakemake-executor-plugin-slurm-jobstep
# drops every SLURM_* variable (SLURM_CONF included) before its nested `srun`, which then looks for
# /etc/slurm/slurm.conf -- where a real cluster keeps it, and where this test cluster must not write.
# PATH is exported to jobs (sbatch --export=ALL), so the nested srun finds the wrapper first.
real_command() {   # first $1 on PATH that is not such a wrapper (a caller may have sourced an env.sh)
    local d
    local -a dirs
    IFS=: read -r -a dirs <<<"$PATH"
    for d in "${dirs[@]}"; do
        [[ -n $d && -x $d/$1 && ! -d $d/$1 ]] || continue
        grep -qs '^SLURM_CONF=.* exec ' "$d/$1" && continue
        echo "$d/$1"
        return 0
    done
    return 1
}
[[ $STATE == /?* ]] || die "bad state dir '$STATE'"
mkdir -p "$STATE/bin"
for c in srun sbatch squeue scancel scontrol sinfo sacct; do
    real=$(real_command "$c") || continue
    printf '#!/bin/sh\nSLURM_CONF=%s/slurm.conf exec %s "$@"\n' "$STATE" "$real" >"$STATE/bin/$c"
    chmod 755 "$STATE/bin/$c"
done

cat >"$STATE/env.sh" <<EOF
export SLURM_CONF=$STATE/slurm.conf
export PATH=$STATE/bin:\$PATH
export GEM3D_SLURM_PARTITION=$PARTITION
EOF
export SLURM_CONF=$STATE/slurm.conf

# ---------------------------------------------------------------- daemons
started() { echo "$1 $2" >>"$STATE/pids"; }
fail() {
    echo "start_slurm.sh: $*" >&2
    for f in munged.log slurmctld.log slurmd.log slurmctld.out slurmd.out; do
        [[ -s $STATE/$f ]] && { echo "---- $STATE/$f (tail)" >&2; tail -n 30 "$STATE/$f" >&2; }
    done
    "$(dirname "${BASH_SOURCE[0]}")/stop_slurm.sh" "$STATE" || true   # end what was started so far
    exit 1
}

mungekey --create --force --keyfile="$STATE/munge/munge.key" >/dev/null 2>&1 \
    || { dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none; }
chmod 600 "$STATE/munge/munge.key"
# Daemons run in the foreground (so $! is their PID) with stdio detached from the caller's pipes.
munged --foreground --force --socket="$SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munged.log" \
    --seed-file="$STATE/munge/munged.seed" </dev/null >"$STATE/munged.out" 2>&1 &
started munged $!
for _ in $(seq 50); do [[ -S $SOCKET ]] && break; sleep 0.1; done
[[ -S $SOCKET ]] || fail "munged did not create $SOCKET"

slurmctld -D -c -i -f "$SLURM_CONF" </dev/null >"$STATE/slurmctld.out" 2>&1 &
started slurmctld $!
ctld_up() { local out; out=$(scontrol ping 2>/dev/null) || return 1; [[ $out == *UP* ]]; }
for _ in $(seq 100); do ctld_up && break; sleep 0.2; done
ctld_up || fail "slurmctld did not come up"

slurmd -D -N "$NODE" -f "$SLURM_CONF" </dev/null >"$STATE/slurmd.out" 2>&1 &
started slurmd $!
state=""
for _ in $(seq 150); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    case $state in
        idle* | mixed* | allocated*) break ;;
        drain* | down*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case $state in
    idle* | mixed* | allocated*) ;;
    *) fail "node $NODE is '$state', not idle ($(scontrol show node "$NODE" 2>&1 | grep -i reason || true))" ;;
esac

echo "start_slurm.sh: SLURM up: partition $PARTITION, node $NODE ($CPUS CPUs, ${MEM} MB, $N_GPUS fake GPUs)," \
    "SLURM_CONF=$SLURM_CONF" >&2
