#!/usr/bin/env bash
# A single-host Slurm for tests, CI and trying `launcher submit` without a cluster.
#
#   bash cluster/dev/slurm-up.sh      # installs Debian's slurm + munge if missing, starts them
#   export SLURM_CONF=/tmp/launcher-slurm/slurm.conf   # printed at the end; sinfo, sbatch, ...
#   bash cluster/dev/slurm-down.sh    # stops exactly the daemons started here (pid files)
#
# Everything lives in $LAUNCHER_SLURM_DIR (default /tmp/launcher-slurm): the configuration, the
# munge key and socket, state, logs and pid files. Nothing under /etc is changed. Ports:
# $LAUNCHER_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
# If this directory already runs a responsive Slurm, the script only reports it.
set -euo pipefail

DIR="${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}"
PORT="${LAUNCHER_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

log() { printf 'slurm-up: %s\n' "$*" >&2; }

if [ -f "$CONF" ] && timeout 5 sinfo -h >/dev/null 2>&1; then
  log "already up ($CONF)"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi

missing=()
for bin in munged:munge slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "${bin%%:*}" >/dev/null 2>&1 \
    || missing+=("${bin##*:}")
done
export PATH="$PATH:/usr/sbin"
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client munge)"
    exit 1
  fi
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >"$DIR.apt.log" 2>&1 \
    || { apt-get update >>"$DIR.apt.log" 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >>"$DIR.apt.log" 2>&1; } \
    || { log "apt-get failed, see $DIR.apt.log"; exit 1; }
fi

mkdir -p "$DIR"/{state,spool,log,munge}
chmod 700 "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; }
chmod 400 "$DIR/munge/munge.key"

NODE="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
USER_NAME="$(id -un)"

cat >"$CONF" <<CONF
# Written by cluster/dev/slurm-up.sh: one host is controller and the only compute node.
ClusterName=launcher-dev
SlurmctldHost=$NODE
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$USER_NAME
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SchedulerParameters=defer_batch=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

started() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! started "$DIR/munged.pid"; then
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
fi
if ! started "$DIR/slurmctld.pid"; then
  slurmctld -f "$CONF" -i >>"$DIR/log/slurmctld.out" 2>&1
fi
if ! started "$DIR/slurmd.pid"; then
  slurmd -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1
fi

for _ in $(seq 1 120); do
  state="$(timeout 5 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true)"
  if [ "$state" = idle ]; then
    log "node $NODE idle ($CPUS CPUs, ${MEM_MB} MB) in partition debug"
    echo "export SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.5
done
log "the node did not become idle within 60 s (state: ${state:-unknown}); logs in $DIR/log"
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
