"""Follow a running ``lm_eval`` subprocess: copy its output to the log file and show its progress bar on the terminal.

lm-eval and vLLM draw tqdm bars ("Processed prompts: 44%|...| 8/18 [00:30<00:40, ..., est. speed input: 1234.56
toks/s, output: 12.34 toks/s]"; "Running loglikelihood requests: ..."). A long evaluation step would otherwise be
silent for minutes while its bar goes only to the log, so each bar update is turned into one short line: rewritten
in place on a terminal, and on a pipe (CI logs, Ray workers) printed every tenth of the way or once a minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from harness_ext.core.errors import NeedlesError

_BAR = re.compile(
    r"(?P<desc>[A-Za-z][\w .-]*?):\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[\d:]+)(?:<(?P<left>[\d:?]+))?(?P<rest>[^\]]*)\]"
)
_SPEED = re.compile(r"input:\s*(?P<inp>[\d.]+)\s*toks/s,\s*output:\s*(?P<out>[\d.]+)\s*toks/s")
_PIPE_EVERY_S = 60.0


@dataclass(frozen=True)
class Progress:
    """One update of a tqdm bar, as read from lm_eval's output."""

    desc: str
    done: int
    total: int
    elapsed: str
    left: str | None
    input_tps: float | None
    output_tps: float | None

    def text(self) -> str:
        """One short line. The time left is tqdm's extrapolation, shown from 2 % done: lm-eval's request bar around
        vLLM stands at 0 until vLLM returns every reply at once, then reads 1/N after the whole run's time."""
        what = "prompts" if "prompt" in self.desc.lower() else "requests"
        parts = [f"{self.desc}: {self.done}/{self.total} {what}", f"{self.elapsed} elapsed"]
        if self.left and "?" not in self.left and self.done < self.total and self.done * 50 >= self.total:
            parts.append(f"~{self.left} left")
        if self.input_tps is not None:
            parts.append(f"{self.input_tps:,.0f} tok/s in, {self.output_tps:,.1f} tok/s out")
        return ", ".join(parts)


def parse_progress(fragment: str) -> Progress | None:
    """The last tqdm bar in one ``\\r``/``\\n``-separated fragment of output, or None when it holds none."""
    bars = list(_BAR.finditer(fragment))
    if not bars:
        return None
    found = bars[-1]
    speed = _SPEED.search(found["rest"])
    return Progress(
        desc=found["desc"].strip(),
        done=int(found["n"]),
        total=int(found["total"]),
        elapsed=found["elapsed"],
        left=found["left"],
        input_tps=float(speed["inp"]) if speed else None,
        output_tps=float(speed["out"]) if speed else None,
    )


class ProgressEcho:
    """Prints progress lines for a label; on a pipe only when a tenth more is done, a minute passed, or it ended."""

    def __init__(self, label: str, stream: IO[str] | None = None, tty: bool | None = None, clock=time.monotonic):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._last: tuple[str, int, float] | None = None  # (desc, tenth, time) of the last printed line
        self._open_line = False

    def update(self, p: Progress) -> None:
        tenth = p.done * 10 // max(p.total, 1)
        now = self.clock()
        if self.tty:
            self.stream.write(f"\r  {self.label}: {p.text()}\033[K")
            self._open_line = True
        else:
            last = self._last
            fresh = last is None or last[0] != p.desc or tenth > last[1] or p.done == p.total
            if not fresh and now - last[2] < _PIPE_EVERY_S:
                return
            self.stream.write(f"  {self.label}: {p.text()}\n")
        self._last = (p.desc, tenth, now)
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def follow(
    cmd: list[str], env: dict, log_file: Path, timeout: float, echo: ProgressEcho | None
) -> subprocess.CompletedProcess:
    """Run ``cmd``, writing all its output to ``log_file`` and its progress to ``echo``; exit 2 on a timeout."""
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # A timer, not a check between reads: a hung engine prints nothing, and a read would wait forever.
        expired = threading.Event()

        def stop() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        assert proc.stdout is not None
        pending = b""
        try:
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                if echo is None:
                    continue
                pending += chunk
                *whole, pending = re.split(rb"[\r\n]", pending)
                for piece in whole:
                    p = parse_progress(piece.decode("utf-8", "replace"))
                    if p is not None:
                        echo.update(p)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # interrupted (Ctrl-C): do not leave an engine running behind us
                proc.kill()
                proc.wait()
            if echo is not None:
                echo.close()
    if expired.is_set():
        raise NeedlesError(
            f"lm_eval ran past its {timeout:.0f} s limit and was stopped (log: {log_file})",
            fix="read the log; give the step more time or score fewer prompts (--limit)",
        )
    return subprocess.CompletedProcess(cmd, proc.returncode)
