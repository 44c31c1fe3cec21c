"""lm_eval's progress on the terminal: real tqdm bars from a real subprocess, read back into short lines."""

import io
import sys
import textwrap

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.plugin.lm_eval_progress import ProgressEcho, follow, parse_progress

VLLM_BAR = (
    "Processed prompts:  44%|████▍     | 8/18 [00:30<00:40,  3.01s/it, "
    "est. speed input: 1234.56 toks/s, output: 12.34 toks/s]"
)


def test_parse_vllm_bar_reads_counts_times_and_speeds():
    p = parse_progress(VLLM_BAR)
    assert (p.desc, p.done, p.total, p.elapsed, p.left) == ("Processed prompts", 8, 18, "00:30", "00:40")
    assert (p.input_tps, p.output_tps) == (1234.56, 12.34)
    assert p.text() == "Processed prompts: 8/18 prompts, 00:30 elapsed, ~00:40 left, 1,235 tok/s in, 12.3 tok/s out"


def test_parse_lm_eval_bar_and_plain_lines():
    p = parse_progress("Running loglikelihood requests: 100%|██████████| 40/40 [00:02<00:00, 19.9it/s]")
    assert (p.desc, p.done, p.total, p.input_tps) == ("Running loglikelihood requests", 40, 40, None)
    assert "left" not in p.text()  # finished: no time left to show
    # the request bar around vLLM: 1 of 576 after the whole generation (the replies come back at once)
    p = parse_progress("Running generate_until requests:   0%|          | 1/576 [17:33<168:13:22, 1053.05s/it]")
    assert p.text() == "Running generate_until requests: 1/576 requests, 17:33 elapsed"
    p = parse_progress("Processed prompts:   4%|▍         | 25/576 [01:55<18:06, 1.97s/it]")
    assert p.text() == "Processed prompts: 25/576 prompts, 01:55 elapsed, ~18:06 left"
    assert parse_progress("INFO 12-07 01:02:03 loading model weights took 0.3 GiB") is None


def _updates(n: int, total: int = 20):
    return [parse_progress(f"Processed prompts: {100 * i // total}%|x| {i}/{total} [00:0{i % 10}<00:01]") for i in n]


def test_pipe_echo_prints_each_tenth_not_each_update():
    out = io.StringIO()
    echo = ProgressEcho("eval_kv", stream=out, tty=False, clock=lambda: 0.0)
    for p in _updates(range(0, 21)):
        echo.update(p)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 0/20 then one per tenth (2/20, 4/20, ..., 20/20)
    assert lines[0].startswith("  eval_kv: Processed prompts: 0/20 prompts") and "20/20" in lines[-1]


def test_pipe_echo_prints_a_slow_step_once_a_minute():
    out, now = io.StringIO(), [0.0]
    echo = ProgressEcho("eval", stream=out, tty=False, clock=lambda: now[0])
    for i, p in enumerate(_updates([1, 1, 1], total=100)):
        now[0] = 61.0 * i
        echo.update(p)
    assert len(out.getvalue().splitlines()) == 3


def test_tty_echo_rewrites_one_line_and_ends_it():
    out = io.StringIO()
    echo = ProgressEcho("eval", stream=out, tty=True)
    for p in _updates([1, 2]):
        echo.update(p)
    echo.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def _script(tmp_path, body: str):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_follow_logs_everything_and_echoes_a_real_tqdm_bar(tmp_path):
    cmd = _script(
        tmp_path,
        """
        import sys
        from tqdm import tqdm
        print("engine ready", flush=True)
        for _ in tqdm(range(10), desc="Processed prompts", file=sys.stderr, mininterval=0, miniters=1):
            pass
        print("done", flush=True)
        """,
    )
    out, log = io.StringIO(), tmp_path / "run.log"
    proc = follow(cmd, {"PATH": "/usr/bin:/bin"}, log, 60, ProgressEcho("eval_kv", stream=out, tty=False))
    assert proc.returncode == 0
    assert "engine ready" in log.read_text() and "10/10" in log.read_text()
    assert out.getvalue().splitlines()[-1].startswith("  eval_kv: Processed prompts: 10/10 prompts")


def test_follow_stops_a_silent_hung_child_with_a_clear_error(tmp_path):
    cmd = _script(tmp_path, "import time\ntime.sleep(60)\n")
    with pytest.raises(NeedlesError, match="past its 1 s limit") as err:
        follow(cmd, {}, tmp_path / "run.log", 1, None)
    assert "run.log" in str(err.value)
