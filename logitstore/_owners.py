"""Who writes a store: the process a claim or a writer's file names, and whether it still runs.

A writer names its process in each claim (``claims/<i>.claim``) and in its own file
(``claims/writer-<host hash>-<pid>``): ``pid N start T on HOST``, where ``T`` is the process's
start time in clock ticks since boot (Linux ``/proc``; left out elsewhere). A resume refuses to
clear the claims of a process that is still running on its host; the start time tells that
process from a later one given the same pid (a container restarted in place numbers its
processes from 1 again). A process on another host cannot be told from a crashed one.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from typing import Any

from logitstore.storage import _fs

_OWNER = re.compile(r"pid (\d{1,10})(?: start (\d{1,20}))? on (.*)")


def _start_time(pid: int) -> int | None:
    """Clock ticks since boot at which process ``pid`` started, where ``/proc`` says."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096).decode("ascii", "replace")
        # Field 2 (the command) is in parentheses and may hold spaces: count after its end.
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner() -> str:
    """What this process writes into a claim or its writer's file."""
    start = _start_time(os.getpid())
    started = "" if start is None else f" start {start}"
    return f"pid {os.getpid()}{started} on {socket.gethostname()}\n"


def writer_file(claims_dir: str) -> str:
    """This process's writer file under ``claims_dir``."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return _fs.join(claims_dir, f"writer-{host}-{os.getpid()}")


def live_here(text: str) -> int | None:
    """The pid an owner text names, if it is another process of this host that still runs
    (the same pid started at the same time); else None."""
    found = _OWNER.fullmatch(text.strip())
    if found is None or found.group(3) != socket.gethostname():
        return None
    pid = int(found.group(1))
    if pid == os.getpid() or pid < 1:
        return None
    try:
        os.kill(pid, 0)  # signal 0: is there such a process (nothing is sent)
    except PermissionError:
        pass  # there is: another user's
    except (OverflowError, OSError):  # ProcessLookupError: there is none
        return None
    recorded, now = found.group(2), _start_time(pid)
    if recorded is not None and now is not None and int(recorded) != now:
        return None  # another process, given the pid of one that ended
    return pid


def live_writers(fs: Any, claims_dir: str) -> list[tuple[str, int]]:
    """``(file name, pid)`` of each claim or writer file under ``claims_dir`` that names a
    process of this host still running."""
    found = []
    for name in _fs.list_names(fs, claims_dir):
        try:
            text = _fs.read_bytes(fs, _fs.join(claims_dir, name))[:200].decode("utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            continue  # released meanwhile, or not a writer's
        pid = live_here(text)
        if pid is not None:
            found.append((name, pid))
    return found
