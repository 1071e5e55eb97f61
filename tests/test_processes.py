"""fraud.processes: the one spawn/stop helper of `fraud serve` and `fraud deploy --target local`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fraud.errors import UserError
from fraud.processes import (
    child_env,
    process_alive,
    read_pid_file,
    spawn,
    stop_process,
    write_pid_file,
)

IGNORE_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
)


def wait_for_log(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1]
    except OSError:
        return ""


def test_an_exited_child_is_reaped_not_left_a_zombie(tmp_path):
    process = spawn([sys.executable, "-c", "print('bye')"], cwd=tmp_path, log_path=tmp_path / "c.log", env=os.environ)
    deadline = time.monotonic() + 60
    while state_of(process.pid) not in ("Z", "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state_of(process.pid) in ("Z", "")  # exited, not reaped yet (or already gone)
    assert not process_alive(process.pid)
    assert state_of(process.pid) == ""  # process_alive reaped it
    assert (tmp_path / "c.log").read_text() == "bye\n"


def test_stop_escalates_to_sigkill_and_keeps_the_popen_status(tmp_path):
    log = tmp_path / "stubborn.log"
    process = spawn([sys.executable, "-c", IGNORE_SIGTERM], cwd=tmp_path, log_path=log, env=os.environ)
    wait_for_log(log, "up")
    assert not stop_process(process, 0.3, kill=False)  # SIGTERM ignored, no SIGKILL asked for
    assert process.poll() is None
    assert stop_process(process, 0.3)
    assert process.returncode == -9


def test_stop_of_a_detached_group_ends_its_grandchildren(tmp_path):
    log = tmp_path / "group.log"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(child.pid, flush=True); time.sleep(600)"
    )
    leader = spawn([sys.executable, "-c", script], cwd=tmp_path, log_path=log, env=os.environ, detached=True)
    deadline = time.monotonic() + 60
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(log.read_text().split()[0])
    assert os.getpgid(grandchild) == leader.pid
    assert stop_process(leader.pid, 30.0, group=True)
    deadline = time.monotonic() + 60
    while state_of(grandchild) not in ("Z", "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state_of(grandchild) in ("Z", "")
    assert not process_alive(leader.pid)


def test_a_stopped_pid_that_is_not_running_is_a_no_op():
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    assert not process_alive(0)
    assert stop_process(2**22 + 12345)  # no such pid


def test_child_env_drops_pythonpath_and_adds_overrides():
    env = child_env({"PYTHONPATH": "/x", "A": "1"}, B="2")
    assert env == {"A": "1", "B": "2"}


def test_pid_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "sub" / "serve.pid"
    with pytest.raises(UserError, match="does not exist"):
        read_pid_file(path)
    write_pid_file(path, 4242)
    assert read_pid_file(path) == 4242
    path.write_text("garbage")
    with pytest.raises(UserError, match="does not hold a process id"):
        read_pid_file(path)
