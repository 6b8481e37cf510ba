"""Ray's ports: two jobs on one node never get the same block (launcher.backends.ports), which the
job id alone could not promise (ids 1 and 221 map to the same slot)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from launcher.backends.ports import block_size, reserve

IP = "127.0.0.1"
FIRST, LAST, SIZE = 7000, 7999, 100
# ten blocks, away from the job scripts' 10000-31999 and below the ephemeral range (32768-): the
# kernel hands ports there to any outgoing connection of this busy machine, which would fail the probe


def test_two_jobs_preferring_the_same_block_get_different_ones(tmp_path):
    a = reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST + 300, lock_root=tmp_path)
    b = reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST + 300, lock_root=tmp_path)
    assert a == FIRST + 300 and b == FIRST + 400
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{IP}-{a}", f"{IP}-{b}"]


def test_a_port_in_use_by_anything_else_skips_its_block(tmp_path):
    with socket.socket() as s:
        s.bind((IP, FIRST + 555))
        s.listen()
        got = reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST + 500, lock_root=tmp_path)
    assert got == FIRST + 600
    assert not (tmp_path / f"{IP}-{FIRST + 500}").exists()   # the lock of the skipped block is released


def test_a_lock_whose_owner_is_gone_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f"{IP}-{FIRST}"
    stale.mkdir()
    (stale / "pid").write_text(dead.stdout.strip())
    assert reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST, lock_root=tmp_path) == FIRST
    assert (stale / "pid").read_text() == str(os.getpid())


def test_nodes_sharing_tmp_but_not_a_network_do_not_block_each_other(tmp_path):
    # the namespaces of cluster/dev/slurm-up.sh share /tmp; the lock names the address
    assert reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST, lock_root=tmp_path) == FIRST
    assert reserve("127.0.0.2", os.getpid(), SIZE, FIRST, LAST, FIRST, lock_root=tmp_path) == FIRST


def test_every_block_taken_is_none_and_the_cli_says_so(tmp_path):
    for _ in range(10):
        assert reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST, lock_root=tmp_path) is not None
    assert reserve(IP, os.getpid(), SIZE, FIRST, LAST, FIRST, lock_root=tmp_path) is None
    res = subprocess.run([sys.executable, "-m", "launcher.backends.ports", IP, str(os.getpid()), str(SIZE),
                          str(FIRST), str(LAST), str(FIRST)], capture_output=True, text=True,
                         env={**os.environ, "LAUNCHER_PORT_LOCKS": str(tmp_path)})
    assert res.returncode == 1 and "no block of 100 free ports" in res.stderr


def test_worker_ports_grow_with_the_cpus():
    assert block_size(2) == 100 and block_size(45) == 100 and block_size(48) == 200 and block_size(96) == 300 and block_size(256) == 600
