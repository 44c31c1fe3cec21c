"""The `needles` entry point behaves like a well-mannered Unix tool, in a pipe and in-process."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

from harness_ext.cli import main


def test_main_leaves_the_sigpipe_disposition_alone(capsys):
    # SIGPIPE=SIG_DFL inside main() once killed a whole pytest run: any later write to a socket whose
    # peer had closed (the loopback OpenAI server) ended the process with no traceback.
    before = signal.getsignal(signal.SIGPIPE)
    assert main(["tasks-path"]) == 0
    assert signal.getsignal(signal.SIGPIPE) == before
    assert capsys.readouterr().out.strip().endswith("kv_tasks")


def test_output_cut_short_by_head_exits_quietly():
    needles = shutil.which("needles", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert needles, "the needles console script is not installed next to this interpreter"
    # 2,000 documents of JSONL is far more than a pipe buffer, so the writer hits a closed pipe
    proc = subprocess.run(
        f"'{needles}' generate-kv --num-samples 2000 --seed 3 | head -c 100",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
    )
    assert len(proc.stdout) == 100
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]
