"""`aistack up` restarts a process that crashed (exit code > 0), as compose's restart policy would,
and leaves down one that exited cleanly or was killed by a signal."""
from __future__ import annotations

import signal
import sys

from services.cli.stack import Proc, Stack


def _proc(tmp_path, name: str, code: str) -> Proc:
    proc = Proc(name, [sys.executable, "-c", code], {}, None, tmp_path / f"{name}.log")
    Stack._popen(proc)
    proc.popen.wait(30)
    return proc


def test_a_crashed_process_restarts_with_backoff_and_a_killed_or_clean_one_stays_down(tmp_path):
    stack = Stack(tmp_path)
    crashed = _proc(tmp_path, "crashed", "import sys; sys.exit(3)")
    clean = _proc(tmp_path, "clean", "pass")
    killed = Proc("killed", [sys.executable, "-c", "import time; time.sleep(60)"], {}, None, tmp_path / "k.log")
    Stack._popen(killed)
    killed.popen.send_signal(signal.SIGKILL)
    killed.popen.wait(30)
    stack.procs += [crashed, clean, killed]
    first = crashed.popen

    assert stack.supervise(now=100.0) == []          # the crash is seen: a restart is due in 1 s
    assert stack.supervise(now=100.5) == []
    lines = stack.supervise(now=101.0)
    assert lines == ["aistack: crashed exited with 3; restarting it (restart 1)"]
    assert crashed.popen is not first and "restarting it" in crashed.log_path.read_text()
    crashed.popen.wait(30)                             # it crashes again: the next wait is 2 s
    assert stack.supervise(now=200.0) == [] and stack.supervise(now=201.5) == []
    assert len(stack.supervise(now=202.0)) == 1
    crashed.popen.wait(30)

    assert clean.popen.returncode == 0 and killed.popen.returncode == -signal.SIGKILL
    assert {p.name for p in stack.down_for_good()} == {"clean", "killed"}
    stack._stopping.set()                              # a stopping stack restarts nothing
    assert stack.supervise(now=1000.0) == [] and stack.supervise(now=2000.0) == []
    for p in stack.procs:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()
