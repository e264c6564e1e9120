"""Run folders: runs started at the same instant, in threads or in processes, each get their own
folder (no run writes into another's, none fails)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jaxprune.results import new_run_dir

# Waits for the test's go-ahead, then makes run folders as fast as it can and prints them.
MAKER = """
import os, sys, time
from pathlib import Path
from jaxprune.results import new_run_dir
base, ready, go = sys.argv[1:4]
Path(ready).touch()
while not os.path.exists(go):
    time.sleep(0.001)
for _ in range(4):
    print(new_run_dir(base))
"""


def test_threads_started_at_once_get_their_own_run_folders(tmp_path):
    base, n = tmp_path / "runs", 32
    start = threading.Barrier(n)

    def make(_):
        start.wait()
        return new_run_dir(base)

    with ThreadPoolExecutor(n) as pool:
        made = list(pool.map(make, range(n)))
    assert len(set(made)) == n
    assert sorted(base.iterdir()) == sorted(made)


def test_processes_started_at_once_get_their_own_run_folders(tmp_path):
    base, n = tmp_path / "runs", 6
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MAKER, str(base), str(tmp_path / f"ready-{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline, "the processes did not start"
        time.sleep(0.01)
    go.touch()
    made = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        made += [Path(line) for line in out.split()]
    assert len(made) == 4 * n and len(set(made)) == len(made)
    assert sorted(base.iterdir()) == sorted(made)


def test_a_taken_name_gets_the_next_suffix(tmp_path):
    first = new_run_dir(tmp_path)
    (tmp_path / f"{first.name}-2").write_text("a file, not a run folder")
    # Same second (most likely): -3; the next second: a fresh stamp. Never an existing path.
    second = new_run_dir(tmp_path)
    assert second.is_dir() and second not in (first, tmp_path / f"{first.name}-2")
