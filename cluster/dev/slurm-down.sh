#!/usr/bin/env bash
# Stop the daemons cluster/dev/slurm-up.sh started, by their pid files, and nothing else; with
# a multi-node cluster also every process left in its namespaces, the namespaces, the veth pairs
# and the bridge it created (as listed in $DIR/netns.list).
#   bash cluster/dev/slurm-down.sh [--nodes N]   # N > 1: the multi-node cluster's directory
# LAUNCHER_SLURM_DIR as for slurm-up.sh. Set LAUNCHER_SLURM_PURGE=1 to also delete that directory.
set -uo pipefail

NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-1}"; shift 2 ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) printf 'slurm-down: unknown argument %s (usage: slurm-down.sh [--nodes N])\n' "$1" >&2; exit 2 ;;
  esac
done
if [ "$NODES" != 1 ]; then DEFAULT_DIR=/tmp/launcher-slurm-mn; else DEFAULT_DIR=/tmp/launcher-slurm; fi
DIR="${LAUNCHER_SLURM_DIR:-$DEFAULT_DIR}"
export PATH="$PATH:/usr/sbin"

stop() {  # stop NAME PIDFILE
  local pid
  [ -f "$2" ] || return 0
  pid="$(cat "$2")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; fi
    printf 'slurm-down: stopped %s (pid %s)\n' "$1" "$pid" >&2
  fi
  rm -f "$2"
}

# Cancel what is left in the queue first, so that no job step outlives the daemons.
if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
  SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --quiet --partition=debug 2>/dev/null || true
  sleep 1
fi
for pidfile in "$DIR"/slurmd.pid "$DIR"/slurmd-*.pid; do
  [ -e "$pidfile" ] || continue
  name="$(basename "$pidfile" .pid)"
  stop "$name" "$pidfile"
done
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"

# The network of a multi-node cluster: only what slurm-up.sh recorded as created.
if [ -f "$DIR/netns.list" ]; then
  while read -r kind name; do
    [ "$kind" = netns ] || continue
    pids="$(ip netns pids "$name" 2>/dev/null)"
    if [ -n "$pids" ]; then  # job steps, Ray, training workers left in the node
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null
      printf 'slurm-down: killed %s process(es) left in %s\n' "$(echo $pids | wc -w)" "$name" >&2
    fi
  done <"$DIR/netns.list"
  while read -r kind name; do
    case "$kind" in
      netns) ip netns del "$name" 2>/dev/null && printf 'slurm-down: removed namespace %s\n' "$name" >&2 ;;
      link) ip link del "$name" 2>/dev/null ;;
    esac
  done <"$DIR/netns.list"
  while read -r kind name; do
    if [ "$kind" = bridge ]; then
      ip link del "$name" 2>/dev/null && printf 'slurm-down: removed bridge %s\n' "$name" >&2
    fi
  done <"$DIR/netns.list"
  rm -f "$DIR/netns.list"
fi
if [ "${LAUNCHER_SLURM_PURGE:-0}" = 1 ]; then rm -rf "$DIR"; fi
exit 0
