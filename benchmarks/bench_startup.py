"""Startup cost of the installed plugin: bare interpreter start, ``import lm_eval.tasks`` and ``lm_eval ls tasks``,
with and without the plugin's import hook, in the same run.

Run: python benchmarks/bench_startup.py [--repeats 15] [--ls-repeats 2]

The plugin registers through ``lm_eval_needles.pth`` in site-packages (one line that puts a lazy
finder on ``sys.meta_path``; harness_ext.plugin.autoload). There is no switch to turn it off, and
``python -S`` alone would drop all of site-packages, so both sides start the same way: ``python -S -c``,
then the real site-packages folder is added the way ``site.addsitedir`` does it (appended to
``sys.path``, then every ``*.pth`` file processed in sorted order with ``site.addpackage``), then the
payload. "without" skips ``lm_eval_needles.pth``, nothing else (the editable install of harness_ext stays
importable, it is just not hooked in). Same files, same paths, so only the hook differs. Runs alternate
between the sides; the median is reported (the minimum for ``ls``, which takes seconds).

Must: a bare interpreter start imports no module of this package, and costs at most 5 ms more with the
hook than without it (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HOOK_FILES = {"lm_eval_needles.pth", "lm_eval_needles.start"}
MUST_MS = 5.0

PAYLOADS = {
    "interpreter start": "pass",
    "import lm_eval": "import lm_eval",
    "import lm_eval.tasks (hook fires)": "import lm_eval.tasks",
    "lm_eval ls tasks": "import sys; sys.argv = ['lm_eval', 'ls', 'tasks']; from lm_eval.__main__ import cli_evaluate; "
    "cli_evaluate()",
}
PROBE = (
    "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('harness_ext', 'kv_tasks')), "
    "any(type(f).__name__ == '_NeedlesLazyFinder' for f in sys.meta_path))"
)


def command(site: Path, payload: str, hook: bool) -> list[str]:
    skip = () if hook else tuple(HOOK_FILES)
    boot = (
        f"import os, site, sys; d = {str(site)!r}; sys.path.append(d); known = set(); "
        f"[site.addpackage(d, n, known) for n in sorted(os.listdir(d)) if n.endswith('.pth') and n not in {skip!r}]"
    )
    return [sys.executable, "-S", "-c", f"{boot}; {payload}"]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="runs per side of the short payloads")
    parser.add_argument(
        "--ls-repeats",
        type=int,
        default=2,
        choices=range(1, 100),
        metavar="N",
        help="runs per side of `lm_eval ls tasks`",
    )
    args = parser.parse_args()

    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "lm_eval_needles.pth").is_file():
        print(f"the plugin hook is not installed in {site} (run scripts/setup.sh)", file=sys.stderr)
        return 2
    sides = {"with plugin": True, "without plugin": False}

    loaded = {name: timed(command(site, PROBE, hook))[1].strip() for name, hook in sides.items()}
    rows = []
    listed = {}
    for label, payload in PAYLOADS.items():
        reps = args.ls_repeats if "ls" in label else args.repeats
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(reps):
            for name, hook in sides.items():
                seconds, out = timed(command(site, payload, hook))
                times[name].append(seconds)
                if "ls" in label:
                    listed[name] = out.count("\n")
        pick = min if "ls" in label else statistics.median
        w, wo = pick(times["with plugin"]), pick(times["without plugin"])
        rows.append((label, reps, w, wo))
        print(f"{label}: with {w * 1000:.1f} ms, without {wo * 1000:.1f} ms", file=sys.stderr, flush=True)

    print(f"\nStartup, python {sys.version.split()[0]}, {sys.executable}\n")
    print("| what | runs per side | with plugin | without plugin | difference |")
    print("|---|---:|---:|---:|---:|")
    for label, reps, w, wo in rows:
        print(f"| {label} | {reps} | {w * 1000:.0f} ms | {wo * 1000:.0f} ms | {(w - wo) * 1000:+.0f} ms |")
    print(
        f"\nafter a bare start (modules of this package, hook on sys.meta_path): with {loaded['with plugin']}, without {loaded['without plugin']}"
    )
    if listed:
        print(f"`lm_eval ls tasks` output lines: with {listed['with plugin']}, without {listed['without plugin']}")
    start = rows[0]
    ok = (
        loaded["with plugin"] == "[] True"
        and loaded["without plugin"] == "[] False"
        and (start[2] - start[3]) * 1000 <= MUST_MS
    )
    print(f"\nmust (bare start imports nothing of ours, costs <= {MUST_MS:.0f} ms): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
