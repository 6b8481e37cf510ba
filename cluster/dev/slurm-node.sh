#!/usr/bin/env bash
# Faults for one node of the multi-node dev cluster (cluster/dev/slurm-up.sh --nodes N):
#   bash cluster/dev/slurm-node.sh kill I    # the node "crashes": every process in its namespace, slurmd included
#   bash cluster/dev/slurm-node.sh start I   # it comes back: its slurmd starts again (Slurm returns it to service)
#   bash cluster/dev/slurm-node.sh cut I     # a partition: its link to the bridge goes down
#   bash cluster/dev/slurm-node.sh heal I    # and up again
# Acts only on what slurm-up.sh created (lnch-nodeI, lnchvI); LAUNCHER_SLURM_DIR as for slurm-up.sh.
set -euo pipefail
DIR="${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm-mn}"
export PATH="$PATH:/usr/sbin"
usage() { echo "usage: slurm-node.sh kill|start|cut|heal NODE_INDEX (e.g. kill 2)" >&2; exit 2; }
[ $# -eq 2 ] || usage
case "$2" in ''|*[!0-9]*) usage ;; esac
NS="lnch-node$2"
grep -qx "netns $NS" "$DIR/netns.list" 2>/dev/null || { echo "slurm-node: $NS is not a node of $DIR" >&2; exit 1; }
case "$1" in
  kill)
    pids="$(ip netns pids "$NS")"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids
    rm -f "$DIR/slurmd-lnode$2.pid"
    echo "slurm-node: killed $(echo $pids | wc -w) process(es) of lnode$2" >&2 ;;
  start)
    nsenter --net="/run/netns/$NS" slurmd -N "lnode$2" -f "$DIR/slurm.conf" >>"$DIR/log/slurmd-lnode$2.out" 2>&1
    echo "slurm-node: started slurmd of lnode$2" >&2 ;;
  cut) ip link set "lnchv$2" down; echo "slurm-node: lnode$2 cut off" >&2 ;;
  heal) ip link set "lnchv$2" up; echo "slurm-node: lnode$2 reconnected" >&2 ;;
  *) usage ;;
esac
