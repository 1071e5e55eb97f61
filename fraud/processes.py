"""Child processes of the local stacks: spawn one with its output in a log file, tell whether a pid
still runs, stop one (SIGTERM, then SIGKILL after a grace period), and keep a pid file.

Used by the serving stack's supervisor (`fraud serve`, fraud.serving_stack) and by the local canary
stack (`fraud deploy --target local`, fraud.deploy.local), so both treat exits and zombies alike:

* an exited child of this process is reaped as soon as it is looked at (`process_alive`, or
  `Popen.poll` for a `Popen`), so it never lingers as a zombie;
* a zombie that is not ours (its parent has not reaped it yet) counts as stopped.

A child is either *attached* (the kernel sends it SIGTERM when this process dies, PR_SET_PDEATHSIG:
a killed supervisor leaves no orphan) or *detached* (its own session, so it outlives the command
that started it; it is stopped by pid, with its whole process group).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fraud import atomic
from fraud.errors import UserError

_PR_SET_PDEATHSIG = 1


#: Held back while a child is forked: a Ctrl-C arriving inside the fork's at-fork hooks (logging
#: releases its locks there) would be printed as "Exception ignored" and lost, the stack left starting.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _die_with_parent() -> None:
    """preexec_fn of attached children: the kernel sends SIGTERM to the child when its parent dies;
    the stop signals the parent held back during the fork are the child's again."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def child_env(environ: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """The environment of a child: `environ` plus `overrides`, without PYTHONPATH (each child runs
    in its own virtual environment)."""
    env = {**environ, **overrides}
    env.pop("PYTHONPATH", None)
    return env


def spawn(
    command: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    env: Mapping[str, str],
    append: bool = False,
    detached: bool = False,
) -> subprocess.Popen:
    """Start `command` with stdout and stderr in `log_path` (appended to with `append`) and no stdin.

    `env` is passed as is (build it with `child_env`). `detached`: its own session (outlives this
    process); otherwise it gets SIGTERM when this process dies."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log:
        if detached:
            return subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - a signal mask and a prctl flag; spawned from the main thread
            )
        finally:  # a stop signal that came meanwhile is raised here, in plain code (the child dies with us)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[-1][:1] == "Z"
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """True while `pid` runs. An exited child of this process is reaped here; a zombie is not alive."""
    if pid <= 0:
        return False
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if finished == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _running(target: subprocess.Popen | int) -> bool:
    # a Popen is polled through its own object, so it keeps its return code for messages
    return target.poll() is None if isinstance(target, subprocess.Popen) else process_alive(target)


def stop_process(
    target: subprocess.Popen | int, timeout_s: float = 20.0, *, group: bool = False, kill: bool = True
) -> bool:
    """SIGTERM `target` (a Popen, or a pid; with `group` its whole process group, for a detached child)
    and wait up to `timeout_s` for it to end; then SIGKILL it if `kill`. True once it has stopped."""
    pid = target.pid if isinstance(target, subprocess.Popen) else target
    if not _running(target):
        return True

    def send(signum: int) -> bool:
        try:
            if group:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    if not send(signal.SIGTERM):
        return not _running(target)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(target):
            return True
        time.sleep(0.1)
    if not kill:
        return False
    send(signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not _running(target):
            return True
        time.sleep(0.05)
    return not _running(target)


# --- pid file of a detached process ----------------------------------------------------------------
def write_pid_file(path: Path, pid: int) -> None:
    atomic.write_text(path, f"{pid}\n")


def read_pid_file(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise UserError(f"no running stack: pid file {path} does not exist") from None
    if not text.isdigit():
        raise UserError(f"pid file {path} does not hold a process id (got {text[:40]!r})")
    return int(text)


def port_in_use(port: int) -> bool:
    """True if something listens on `port` (KServe servers bind every interface, so test that)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn and grpc do: connections in TIME_WAIT do not make a port "in use", a listener does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False
