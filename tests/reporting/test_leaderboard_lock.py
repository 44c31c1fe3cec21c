"""Concurrent `needles leaderboard -o SAME.csv` runs (e.g. parallel CI jobs) lose no row: the read-modify-write
of the CSV runs under an exclusive file lock. Real processes, released together, each upserting several runs."""

from __future__ import annotations

import subprocess
import sys
import time

from runs_fixture import write_run

from harness_ext.core.output_files import lock_path, locked
from harness_ext.reporting import leaderboard as lb

PROCESSES, UPSERTS = 4, 6

# Each worker waits for the start file, then upserts its runs one export at a time, as separate CLI calls would.
WORKER = """
import sys, time
from pathlib import Path
from harness_ext.cli.app import main
start, out, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
while not start.exists():
    time.sleep(0.001)
for run in runs:
    rc = main(["leaderboard", run, "-o", out])
    if rc != 0:
        sys.exit(rc)
"""


def test_concurrent_upserts_lose_no_row(tmp_path):
    runs = [
        [write_run(tmp_path / f"p{p}u{u}", [1.0, float(u % 2)], model=f"model-{p}-{u}") for u in range(UPSERTS)]
        for p in range(PROCESSES)
    ]
    out, start = tmp_path / "shared" / "leaderboard.csv", tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(start), str(out), *map(str, mine)], stderr=subprocess.PIPE)
        for mine in runs
    ]
    time.sleep(2.0)  # let every interpreter start and wait at the barrier
    start.touch()
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()
    rows = lb.read_csv(out)
    assert sorted({r["model"] for r in rows}) == sorted(
        f"model-{p}-{u}" for p in range(PROCESSES) for u in range(UPSERTS)
    )
    assert len(rows) == PROCESSES * UPSERTS  # one metric per run, nothing duplicated
    assert sorted(p.name for p in out.parent.iterdir()) == ["leaderboard.csv"]  # no lock or temp file left


def test_lock_excludes_a_second_holder(tmp_path):
    """While one process holds the lock, another's read-modify-write waits for it."""
    target = tmp_path / "lb.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target), str(tmp_path / "held")], stdout=subprocess.PIPE, text=True
    )
    while not (tmp_path / "held").exists():
        time.sleep(0.01)
    t0 = time.monotonic()
    with locked(target):
        waited = time.monotonic() - t0
        assert lock_path(target).exists()
    holder.wait(timeout=30)
    assert waited >= 0.8, waited  # the holder keeps it for 1 s after signalling
    assert not lock_path(target).exists()


HOLD = """
import sys, time
from pathlib import Path
from harness_ext.core.output_files import locked
with locked(Path(sys.argv[1])):
    Path(sys.argv[2]).touch()
    time.sleep(1.0)
"""
