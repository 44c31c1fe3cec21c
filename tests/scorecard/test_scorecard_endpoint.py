"""`needles scorecard MODEL --base-url URL`: a model behind an OpenAI-compatible endpoint, through the real `needles`
CLI, the real `lm_eval run` CLI (a subprocess) and its `local-chat-completions` class, against a loopback server
speaking OpenAI's wire format (tests/openai_loopback.py: the one allowed mock, standing in for a paid API).

The server answers a simple-KV or passkey question right when its prompt is under 384 tokens (SmolLM2's tokenizer, the
one the scorecard sizes prompts with) and wrong otherwise, and never answers multi-key questions: the scorecard must
read effective length 256 for simple KV and passkey and "<256" for multi-key from what the server said. NIAH, MDQA and
FLenQA point at an empty mirror, so they are left out (as offline); the loss family is not planned (chat completions
return no prompt log-probabilities). No model, no vLLM.
"""

from __future__ import annotations

import json
import re
import socket

import pytest
from openai_loopback import OpenAILoopback, chat_completion, error, model_list

from harness_ext.cli import main

KEY = "sk-loopback-scorecard-7f3a9c0e51"
MODEL = "needles-served-model"
RIGHT_BELOW = 384  # prompt tokens under which the server answers simple KV right


class KVServer:
    """/v1/models and /v1/chat/completions of a server serving MODEL with ``window`` (vLLM's max_model_len)."""

    def __init__(self, tokenizer, window: int | None = 8192):
        self.tokenizer, self.window, self.counts, self.passkey_counts = tokenizer, window, [], []

    def answer(self, prompt: str, tokens: int) -> str:
        passkey = re.search(r"The pass key is (\d+)\. Remember it\.", prompt)
        if passkey is not None:  # the passkey family: right under RIGHT_BELOW tokens, as simple KV
            return passkey.group(1) if tokens < RIGHT_BELOW else "00000"
        key = re.search(r"Report the value of key (\d+) and", prompt)
        if key is None:  # multi-key (a tuple key): no answer
            return "I cannot tell."
        found = re.search(r"Dictionary \[(\d+)\] \{[^}]*?(?<!\d)" + key.group(1) + r": (\d+)", prompt)
        if found is None or tokens >= RIGHT_BELOW:
            return f"The value of key {key.group(1)} is 0 and it is in Dictionary [0]."
        return f"The value of key {key.group(1)} is {found.group(2)} and it is in Dictionary [{found.group(1)}]."

    def route(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        if (method, path) == ("GET", "/v1/models"):
            return 200, model_list({MODEL: self.window})
        if (method, path) != ("POST", "/v1/chat/completions"):
            return error(404, f"Unknown request URL: {method} {path}", "unknown_url")
        request = json.loads(body)
        if request.get("model") != MODEL:
            return error(404, f"The model `{request.get('model')}` does not exist.", "model_not_found", "model")
        # the user turn; passkey's reply cue (lm-eval's gen_prefix) comes as a last, assistant message
        prompt = [m["content"] for m in request["messages"] if m["role"] == "user"][-1]
        if request["messages"][-1]["role"] == "assistant":
            assert request["messages"][-1]["content"] == "The pass key is" and "What is the pass key?" in prompt
        tokens = len(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        (self.passkey_counts if "What is the pass key?" in prompt else self.counts).append(tokens)
        return 200, chat_completion(MODEL, self.answer(prompt, tokens), tokens, 20)


@pytest.fixture
def endpoint(smollm2_dir, tmp_path, monkeypatch):
    """start(window) -> (server, state): a loopback OpenAI endpoint; the key is in the environment only."""
    from tokenizers import Tokenizer  # the tokenizer.json transformers loads too, without importing transformers

    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    empty = tmp_path / "no-data"
    empty.mkdir()
    for env in ("NEEDLES_NIAH_MIRROR", "NEEDLES_MDQA_MIRROR", "NEEDLES_FLENQA_MIRROR"):
        monkeypatch.setenv(env, str(empty))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    servers = []

    def start(window: int | None = 8192) -> tuple[OpenAILoopback, KVServer]:
        state = KVServer(tokenizer, window)
        servers.append(OpenAILoopback(state.route, key=KEY))
        return servers[-1], state

    yield start
    for s in servers:
        s.close()


def test_scorecard_of_an_endpoint(endpoint, smollm2_dir, tmp_path, capsys):
    server, state = endpoint()
    out = tmp_path / "card"
    argv = ["scorecard", MODEL, "--base-url", server.base_url, "--tokenizer", str(smollm2_dir), "--budget", "tiny"]
    assert main([*argv, "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert (
        f"local-chat-completions at {server.base_url}" in cap.err
        and f"config.json in the tokenizer folder {smollm2_dir}" in cap.err
    )
    assert f"endpoint {server.base_url} serves {MODEL} (max_model_len 8192)" in cap.err
    assert "3/7 eval_niah: left out" in cap.err and "4/7 eval_passkey: lm_eval run" in cap.err
    assert "long_ppl: not planned (a chat endpoint returns no prompt log-probabilities)" in cap.err
    # what the server received: the model list first, then one chat request per prompt, each with the key
    assert (server.requests[0].method, server.requests[0].path) == ("GET", "/v1/models")
    chats = [r for r in server.requests if r.path == "/v1/chat/completions"]
    # KV: 2 tasks x 2 lengths x 2 depths, passkey: 2 lengths x 2 depths, one sample each
    assert len(chats) == 12 and len(server.requests) == 13 and len(state.passkey_counts) == 4
    assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    for r in chats:
        body = r.json()
        passkey = "What is the pass key?" in body["messages"][0]["content"]
        assert body["model"] == MODEL and body["max_tokens"] == (16 if passkey else 64) and body["temperature"] == 0
        # the server applies the chat template; passkey's reply begins with its cue, an assistant message
        assert [m["role"] for m in body["messages"]] == (["user", "assistant"] if passkey else ["user"])
    # prompts sized to the ladder with the given tokenizer (whole dictionaries up to the length): half just under 256
    # tokens, half just under 512, none above
    short = sorted(c for c in state.counts if c < RIGHT_BELOW)
    long = sorted(c for c in state.counts if c >= RIGHT_BELOW)
    assert len(short) == len(long) == 4 and short[0] > 0.7 * 256 and short[-1] <= 256, state.counts
    assert long[0] > 0.7 * 512 and long[-1] <= 512, state.counts
    # the scorecard reads the server's answers: right under 384 tokens, so simple KV holds at 256 only
    card = json.loads((out / "scorecard.json").read_text(encoding="utf-8"))
    assert card["endpoint"] == {"base_url": server.base_url, "model": MODEL, "tokenizer": str(smollm2_dir),
                                "model_type": "local-chat-completions"}  # fmt: skip
    assert card["window"] == 8192 and card["lengths"] == [256, 512]
    rules = {e["task"]: e["rules"][0] for e in card["effective_length"]}
    assert rules["kv_retrieval_simple"]["outcome"] == "256" and rules["kv_retrieval_multisubkey"]["outcome"] == "<256"
    assert rules["needles_passkey"]["outcome"] == "256" and "long_ppl" not in {f["family"] for f in card["families"]}
    kv = next(f for f in card["families"] if f["family"] == "kv")
    assert "--model local-chat-completions" in kv["command"] and f"model={MODEL}" in kv["command"]
    assert "Scored through the OpenAI-compatible endpoint" in (out / "scorecard.html").read_text(encoding="utf-8")
    assert f"--base-url {server.base_url}" in card["command"]
    # a rerun into the folder resumes: the server is checked again, no prompt is sent again
    asked = len(server.requests)
    assert main([*argv, "-o", str(out)]) == 0
    assert "2/7 eval_kv: done before, skipped" in capsys.readouterr().err
    assert [r.path for r in server.requests[asked:]] == ["/v1/models"]
    # the key never reaches a file: commands, logs, lm-eval's results and samples, the page
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("samples_kv_retrieval_simple") for p in files)
    assert not [p for p in files if KEY.encode() in p.read_bytes()]


def _refused(argv: list[str], capsys, *needles: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "fix:" in err and "Traceback" not in err, err
    for text in needles:
        assert text in err, (text, err)


def test_endpoint_bad_input_exits_2_with_the_fix(endpoint, smollm2_dir, tmp_path, capsys, monkeypatch):
    server, _ = endpoint(window=4096)
    tok = ["--tokenizer", str(smollm2_dir)]
    out = ["-o", str(tmp_path / "card")]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    _refused(
        ["scorecard", MODEL, "--base-url", dead, *tok, *out],
        capsys,
        f"cannot reach the endpoint {dead}",
        "start the server",
    )
    _refused(
        ["scorecard", "gpt-4o-mini", "--base-url", server.base_url, *out],
        capsys,
        "no tokenizer for the endpoint model",
        "--tokenizer",
    )
    _refused(["scorecard", MODEL, "--base-url", server.base_url, "--tokenizer", str(tmp_path / "nowhere"), *out], capsys,
             "no such tokenizer folder")  # fmt: skip
    # the server serves 4096 tokens: the tokenizer folder's 8192 is refused, naming the flag
    _refused(
        ["scorecard", MODEL, "--base-url", server.base_url, *tok, *out],
        capsys,
        "max_model_len 4096, below the planned window 8192",
        "--max-model-len 4096",
    )
    _refused(
        ["scorecard", "other-model", "--base-url", server.base_url, *tok, *out],
        capsys,
        f"serves {MODEL}, not 'other-model'",
    )
    _refused(
        ["scorecard", MODEL, "--base-url", "http://u:sk-in-url@127.0.0.1/v1", *tok, *out],
        capsys,
        "carries credentials",
        "OPENAI_API_KEY",
    )
    _refused(["scorecard", MODEL, "--base-url", server.base_url, *tok, "--on-gpu", *out], capsys, "--on-gpu")
    _refused(
        ["scorecard", MODEL, "--base-url", server.url, *tok, *out],
        capsys,
        "has no path",
        "--base-url http://localhost:8000/v1",
    )
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    _refused(["scorecard", MODEL, "--base-url", server.base_url, *tok, "--max-model-len", "4096", *out], capsys, "HTTP 401", "export OPENAI_API_KEY")  # fmt: skip
    assert not (tmp_path / "card").exists() and not [r for r in server.requests if r.method == "POST"]
    # a dry run asks nothing; MODEL that is a local folder (as `vllm serve FOLDER` names it) is its own tokenizer
    assert main(["scorecard", str(smollm2_dir), "--base-url", server.base_url + "/chat/completions", "--dry-run"]) == 0
    cap = capsys.readouterr()
    commands = [line for line in cap.out.splitlines() if "lm_eval run" in line]  # after the mirrors it used
    assert commands and all(
        f"base_url={server.base_url}/chat/completions,tokenizer={smollm2_dir}," in c for c in commands
    )
    assert "max_length=8192" in commands[0] and "sk-" not in cap.out + cap.err
    assert len(server.requests) == 3  # the three refusals above that asked the server (GET /models), no more


def test_a_task_that_needs_loglikelihood_is_refused(tmp_path, monkeypatch):
    """Chat completions return text only: a task scored by log-probabilities is refused before anything runs."""
    from harness_ext.core.errors import NeedlesError
    from harness_ext.plugin import registration
    from harness_ext.scorecard.endpoint import check_generation_tasks

    (tmp_path / "mc.yaml").write_text("task: needles_mc\noutput_type: multiple_choice\n")
    (tmp_path / "gen.yaml").write_text("group: g\ntask:\n  - needles_mc\noutput_type: generate_until\n")
    monkeypatch.setattr(registration, "tasks_dir", lambda: tmp_path)
    check_generation_tasks(["kv_retrieval_simple"])  # generate_until (and not defined here: the default)
    with pytest.raises(NeedlesError, match=r"cannot score needles_mc \(multiple_choice\)") as info:
        check_generation_tasks(["kv_retrieval_simple", "needles_mc"])
    assert "with vLLM" in info.value.fix
