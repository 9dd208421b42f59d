"""Processes started in a session of their own, found and stopped by session: what `dreambooth up` starts and
what the tests' Ray nodes are. A session reaches every process its leader started (Ray's GCS, raylet, agents,
workers) and nothing else; `ray stop` would stop every Ray on the machine. A process is named by (pid, start
time), so that a reused pid is never mistaken for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path


def spawn(command: list[str], log: Path, env: Mapping[str, str]) -> tuple[int, int]:
    # A session of its own: the process and everything it starts can be found, and stopped, by session id.
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid, start_ticks(process.pid)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_ticks(pid: int) -> int:
    """The process's start time (clock ticks since boot): with the pid, it names one process, never its reuse."""
    return int(_stat(pid)[19])


def alive(pid: int, ticks: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == ticks


def _members(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and fields[0] != "Z":
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
    return pids


def stop_session(pid: int, ticks: int, grace_s: float) -> None:
    """SIGTERM every process of the session `pid` leads, then SIGKILL what is left after `grace_s`. Only while
    the leader is ours or gone: a reused pid leads someone else's session."""
    fields = _stat(pid)
    if fields is not None and int(fields[19]) != ticks:
        return  # the pid was reused: the session is someone else's (ours ended when its last member did)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in _members(pid):
            with contextlib.suppress(OSError):
                os.kill(member, sig)
        deadline = time.monotonic() + grace_s
        while _members(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    with contextlib.suppress(ChildProcessError):  # reap it when this process started it (the demo does)
        os.waitpid(pid, os.WNOHANG)
