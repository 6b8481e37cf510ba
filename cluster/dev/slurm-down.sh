#!/usr/bin/env bash
# Stop the daemons cluster/dev/slurm-up.sh started, by their pid files, and nothing else.
# LAUNCHER_SLURM_DIR as for slurm-up.sh. Set LAUNCHER_SLURM_PURGE=1 to also delete that directory.
set -uo pipefail

DIR="${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}"
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
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"
if [ "${LAUNCHER_SLURM_PURGE:-0}" = 1 ]; then rm -rf "$DIR"; fi
exit 0
