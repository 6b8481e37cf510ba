#!/usr/bin/env bash
# A Slurm for tests, CI and trying `launcher submit` without a cluster.
#
#   bash cluster/dev/slurm-up.sh      # installs Debian's slurm + munge if missing, starts them
#   export SLURM_CONF=/tmp/launcher-slurm/slurm.conf   # printed at the end; sinfo, sbatch, ...
#   bash cluster/dev/slurm-down.sh    # stops exactly the daemons started here (pid files)
#
#   bash cluster/dev/slurm-up.sh --nodes 2      # N compute nodes on this one machine (root)
#   export SLURM_CONF=/tmp/launcher-slurm-mn/slurm.conf
#   bash cluster/dev/slurm-down.sh --nodes 2    # daemons, namespaces and bridge removed
#
# Everything lives in $LAUNCHER_SLURM_DIR (default /tmp/launcher-slurm, with --nodes N > 1
# /tmp/launcher-slurm-mn, so that both can run side by side): the configuration, the munge key
# and socket, state, logs and pid files. Nothing under /etc is changed. Ports:
# $LAUNCHER_SLURM_PORT (slurmctld, default 6817, multi-node 6827) and the next one (slurmd).
#
# --nodes N > 1: each node lnodeI is a Linux network namespace lnch-nodeI with the address
# $LAUNCHER_SLURM_NET.(10+I) (default net 10.231.7) on a bridge lnchbr0 (10.231.7.1, where
# slurmctld listens), interface lnch0 inside; one slurmd per node runs in its namespace
# (`slurmd -N lnodeI`); one slurmctld and one munged serve all (munge's socket is a path). The
# nodes share the filesystem and the PID space, so a shared run directory just works. What was
# created is listed in $DIR/netns.list for slurm-down.sh; a failed start removes it again.
# If this directory already runs a responsive Slurm, the script only reports it.
set -euo pipefail

NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) printf 'slurm-up: unknown argument %s (usage: slurm-up.sh [--nodes N])\n' "$1" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*) echo "slurm-up: --nodes takes a number from 1 to 8, e.g. --nodes 2" >&2; exit 2 ;; esac
if [ "$NODES" -lt 1 ] || [ "$NODES" -gt 8 ]; then echo "slurm-up: --nodes takes a number from 1 to 8" >&2; exit 2; fi
if [ "$NODES" -gt 1 ]; then
  DIR="${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm-mn}"
  PORT="${LAUNCHER_SLURM_PORT:-6827}"
else
  DIR="${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}"
  PORT="${LAUNCHER_SLURM_PORT:-6817}"
fi
NET="${LAUNCHER_SLURM_NET:-10.231.7}"
BRIDGE=lnchbr0
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

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk -v n="$NODES" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)"
USER_NAME="$(id -un)"

# The network of a multi-node cluster: a bridge, and per node a namespace joined to it by a
# veth pair. Every name goes into netns.list as it is made, so slurm-down.sh (and the trap below,
# on a failed start) removes exactly what this script created.
make_network() {
  local i ns
  if [ "$(id -u)" != 0 ]; then log "--nodes $NODES needs root (ip netns)"; exit 1; fi
  command -v ip >/dev/null || { log "--nodes $NODES needs iproute2 (ip)"; exit 1; }
  : >"$DIR/netns.list"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    echo "bridge $BRIDGE" >>"$DIR/netns.list"
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  for i in $(seq 1 "$NODES"); do
    ns="lnch-node$i"
    if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
      ip netns add "$ns"
      echo "netns $ns" >>"$DIR/netns.list"
      ip link add "lnchv$i" type veth peer name lnch0 netns "$ns"
      echo "link lnchv$i" >>"$DIR/netns.list"
      ip link set "lnchv$i" master "$BRIDGE" up
      ip -n "$ns" addr add "$NET.$((10 + i))/24" dev lnch0
      ip -n "$ns" link set lnch0 up
      ip -n "$ns" link set lo up
    fi
  done
}

node_lines() {
  local i
  if [ "$NODES" -eq 1 ]; then
    echo "NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    echo "PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
    return
  fi
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=lnode$i NodeAddr=$NET.$((10 + i)) NodeHostname=lnode$i CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=lnode[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
}

if [ "$NODES" -gt 1 ]; then
  # A failed start leaves nothing behind: daemons, namespaces and bridge go again.
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "failed; cleaning up"; bash "$(dirname "$0")/slurm-down.sh" --nodes "$NODES" >&2 || true; fi' EXIT
  make_network
  CTLD_HOST="$HOST($NET.1)"
  SLURMD_FILES="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
  # Fast failure detection for the fault tests: a node silent for 10 s is down, a job step
  # whose node died ends at once, and a node that comes back rejoins by itself.
  TIMEOUTS="SlurmdTimeout=10
MessageTimeout=5
TCPTimeout=3"
else
  CTLD_HOST="$HOST"
  SLURMD_FILES="SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
  TIMEOUTS=""
fi

cat >"$CONF" <<CONF
# Written by cluster/dev/slurm-up.sh --nodes $NODES.
ClusterName=launcher-dev
SlurmctldHost=$CTLD_HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$USER_NAME
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
$SLURMD_FILES
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
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
$TIMEOUTS
SchedulerParameters=defer_batch=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$(node_lines)
CONF

started() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! started "$DIR/munged.pid"; then
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
fi
if ! started "$DIR/slurmctld.pid"; then
  slurmctld -f "$CONF" -i >>"$DIR/log/slurmctld.out" 2>&1
fi
if [ "$NODES" -eq 1 ]; then
  started "$DIR/slurmd.pid" || slurmd -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1
  WANT="$HOST"
else
  # nsenter, not `ip netns exec`: that one also remounts /sys (no cgroup filesystem for slurmd);
  # only the network is the node's own.
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$DIR/spool/lnode$i"
    started "$DIR/slurmd-lnode$i.pid" \
      || nsenter --net="/run/netns/lnch-node$i" slurmd -N "lnode$i" -f "$CONF" >>"$DIR/log/slurmd-lnode$i.out" 2>&1
  done
  WANT="lnode[1-$NODES]"
fi

for _ in $(seq 1 120); do
  states="$(timeout 5 sinfo -h -N -n "$WANT" -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
  if [ "$states" = "idle " ] && [ "$(timeout 5 sinfo -h -N -n "$WANT" -o '%N' | wc -l)" -eq "$NODES" ]; then
    log "$NODES node(s) idle ($WANT, $CPUS CPUs, ${MEM_MB} MB each) in partition debug"
    echo "export SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.5
done
log "the nodes did not become idle within 60 s (states: ${states:-unknown}); logs in $DIR/log"
tail -n 20 "$DIR"/log/slurmctld.log "$DIR"/log/slurmd*.log >&2 || true
exit 1
