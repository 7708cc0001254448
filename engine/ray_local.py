"""A local Ray cluster that dies with the process that started it, ``kill -9`` included.

``ray.init()`` without an address starts a head node as children of the driver (GCS,
raylet, monitor, dashboard, log monitor). On Linux Ray ties those direct children to the
driver with ``PR_SET_PDEATHSIG`` (``ray._private.utils.set_kill_on_parent_death_linux``),
but not their own children: after a ``kill -9`` of the driver the raylet's dashboard and
runtime-env agents are orphaned and keep running until their own parent check gives up
(measured here: still alive 15 s after the kill, gone only after 60 s).

:func:`init_local_ray` therefore starts a watchdog first: a small process in its own
session (so terminal and process-group signals do not reach it) that reads a pipe from the
driver. While the driver lives, it records every process of the cluster (the driver's new
children and all their descendants, polled once a second, each identified by pid and start
time, so a reused pid is never signalled). When the pipe reaches end-of-file -- the driver
has exited, normally or not -- it SIGKILLs whatever of them is still running. After a
clean ``ray.shutdown()`` it finds nothing left and exits.

This is the pattern of Ray's own ``ray_process_reaper.py`` (a process that waits for EOF on
an inherited pipe), which Ray only uses where the kernel's parent-death signal is missing
and which kills by process group (the agents stay in the driver's group, which also holds
the user's shell pipeline, so a group kill is not an option here).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

#: seconds to wait for a TCP answer from a given Ray address before refusing it
CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a Ray cluster address that nothing answers at, before ``ray.init`` (which, given
    a dead address, retries its GCS connection without end: measured here with Ray 2.60, still
    waiting after 200 s). Takes ``host:port`` or ``ray://host:port``; ``auto`` and addresses
    without a port are left to Ray.

    Raises:
        ConnectionError: no TCP answer at host:port within ``timeout`` seconds (one line naming
            the address and the fix).
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConnectionError(f"no Ray cluster answers at {address} ({why}): start one there with `ray start --head` "
                              "or leave out --ray-address to run on a local Ray") from None


#: watchdog processes of this interpreter; a reference keeps each pipe open until exit
_WATCHDOGS: list[subprocess.Popen] = []
POLL_SECONDS = 1.0


def init_local_ray(**init_kwargs):
    """``ray.init(**init_kwargs)`` for a new local cluster, plus a watchdog that kills the
    cluster's processes when this process exits (see module docstring).

    Returns:
        What ``ray.init`` returns.
    """
    import psutil
    import ray

    me = psutil.Process()
    before = {c.pid for c in me.children()}
    dog = subprocess.Popen(
        [sys.executable, "-m", "distillery.engine.ray_local", str(os.getpid()), *map(str, sorted(before))],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _WATCHDOGS.append(dog)
    ctx = ray.init(**init_kwargs)
    roots = [c.pid for c in me.children() if c.pid not in before and c.pid != dog.pid]
    try:
        dog.stdin.write(("roots " + " ".join(map(str, roots)) + "\n").encode())
        dog.stdin.flush()
    except OSError:
        pass  # the watchdog is gone (killed): the cluster still works, without the clean-up
    return ctx


def _watch(driver: int, exclude: set[int]) -> None:
    """Watchdog loop (runs in the watchdog process): track, then reap on EOF."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    tracked: dict[int, psutil.Process] = {}  # pid -> Process (which remembers the start time)
    roots: list | None = None
    stdin = sys.stdin.buffer.raw
    buf = b""

    def grow(procs) -> None:
        """Add ``procs`` and all their descendants to ``tracked``; keep only the running ones."""
        for p in list(procs):
            if not _running(p):
                continue
            tracked.setdefault(p.pid, p)
            try:
                for c in p.children(recursive=True):
                    tracked.setdefault(c.pid, c)
            except psutil.Error:
                continue
        for pid in [pid for pid, p in tracked.items() if not _running(p)]:
            del tracked[pid]

    while True:
        ready, _, _ = select.select([stdin], [], [], POLL_SECONDS)
        if ready:
            chunk = os.read(stdin.fileno(), 4096)
            if not chunk:
                break  # the driver has exited
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"roots"):
                    roots = []
                    for pid in line.split()[1:]:
                        try:
                            roots.append(psutil.Process(int(pid)))
                        except psutil.Error:
                            pass
                    tracked = {}  # from now on only the cluster's trees, not other children of the driver
        if roots is None:
            try:
                first = [c for c in psutil.Process(driver).children() if c.pid not in exclude and c.pid != me]
            except psutil.Error:
                first = []
            grow(first)
        else:
            grow(roots + list(tracked.values()))
            if not tracked:
                return  # the cluster was shut down cleanly
    grow(list(tracked.values()))
    procs = list(tracked.values())
    for p in procs:
        try:
            p.kill()  # psutil checks the start time first: a reused pid is never signalled
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    _watch(int(sys.argv[1]), {int(x) for x in sys.argv[2:]})
