"""Summarise a test run's timeline (tests/conftest.py writes it when NEEDLES_TEST_TIMELINE=FILE is set):
per worker, its busy time, its first start and last end, and the idle time at the end of the run; then the
slowest test groups (setup included: a test's time covers its fixtures).

    NEEDLES_TEST_TIMELINE=/tmp/t.jsonl make test; python scripts/test_timeline.py /tmp/t.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str, top: int = 15) -> None:
    rows = [json.loads(line) for line in open(path)]
    t0, t1 = min(r["start"] for r in rows), max(r["end"] for r in rows)
    print(f"{len(rows)} tests, {t1 - t0:.0f} s from the first start to the last end")
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_worker[r["worker"]].append(r)
    for worker, items in sorted(by_worker.items()):
        busy = sum(r["end"] - r["start"] for r in items)
        last = max(r["end"] for r in items)
        print(f"  {worker}: {len(items)} tests, busy {busy:.0f} s, idle at the end {t1 - last:.0f} s")
    files: dict[str, float] = defaultdict(float)
    for r in rows:
        files[r["test"].split("::")[0]] += r["end"] - r["start"]
    print("slowest files (s, all their tests, fixtures included):")
    for name, secs in sorted(files.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {secs:7.1f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
