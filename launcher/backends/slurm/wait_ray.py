"""`python -m launcher.backends.slurm.wait_ray ADDRESS NODES TIMEOUT_S`: wait until NODES Ray
nodes are alive in the cluster at ADDRESS (run by the sbatch script before the driver starts)."""

from __future__ import annotations

import socket
import sys
import time


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), 3).close()
        return True
    except OSError:
        return False


def wait_for_nodes(address: str, nodes: int, timeout_s: float) -> bool:
    import ray

    deadline = time.monotonic() + timeout_s
    connected = False
    alive = 0
    while time.monotonic() < deadline:
        try:
            if not connected:
                if not _listening(address):  # ray.init against a head that is not up can block for minutes
                    time.sleep(2)
                    continue
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                connected = True
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                print(f"ray: {alive}/{nodes} nodes joined at {address}", flush=True)
                return True
        except Exception as e:  # the head is still starting
            if connected:
                print(f"ray: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        time.sleep(2)
    print(f"ray: only {alive}/{nodes} nodes joined {address} within {timeout_s:.0f}s", file=sys.stderr)
    return False


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    ok = wait_for_nodes(argv[0], int(argv[1]), float(argv[2]))
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
