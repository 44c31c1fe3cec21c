"""OpenAI finetuning: JSONL export + validation, and the job flow against a loopback server.

The server (tests/openai_loopback.py) speaks OpenAI's wire format for /v1/files (multipart upload) and
/v1/fine_tuning/jobs (create, retrieve, events): the official ``openai`` client talks to it unchanged (the one
allowed mock: no network).
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import time

import pytest
from openai_loopback import OpenAILoopback
from openai_loopback import error as openai_error

from harness_ext.cli import main as cli_main
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.openai_ft import SYSTEM_MESSAGE, validate_rows

KEY = "sk-test-loopback"
EVAL_META = {"lengths": [128], "depths": None, "num_samples": 4}
FINETUNABLE = {"gpt-3.5-turbo-1106", "gpt-4o-mini-2024-07-18"}


class FakeOpenAI:
    """State of the loopback API: uploaded files, jobs, the requests it received."""

    def __init__(self, fail_job: bool = False, steps: int = 6):
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_job = fail_job
        self.steps = steps
        self.ids = itertools.count(1)

    def error(self, status: int, message: str, code: str, param: str | None = None):
        return openai_error(status, message, code, param)

    def upload(self, fields: dict) -> tuple[int, dict]:
        if fields.get("purpose") != "fine-tune":
            return self.error(400, "Invalid purpose", "invalid_value", "purpose")
        content, filename = fields["file"]
        fid = f"file-{next(self.ids):06d}"
        self.files[fid] = {"content": content}
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": "fine-tune",
            "status": "processed",
            "status_details": None,
        }
        self.files[fid]["object"] = obj
        return 200, obj

    def create_job(self, body: dict) -> tuple[int, dict]:
        if body.get("training_file") not in self.files:
            return self.error(
                400, f"invalid training_file: {body.get('training_file')}", "invalid_file", "training_file"
            )
        if body.get("model") not in FINETUNABLE:
            return self.error(
                400,
                f"Model {body.get('model')} is not available for fine-tuning or does not exist.",
                "model_not_available",
                "model",
            )
        jid = f"ftjob-{next(self.ids):06d}"
        hyper = body.get("method", {}).get("supervised", {}).get("hyperparameters", {})
        job = {
            "id": jid,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "model": body["model"],
            "organization_id": "org-test",
            "result_files": [],
            "seed": body.get("seed", 0),
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": None,
            "estimated_finish": None,
            "integrations": [],
            "user_provided_suffix": body.get("suffix"),
            "hyperparameters": {
                "n_epochs": hyper.get("n_epochs", "auto"),
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
            },
            "method": body.get("method"),
        }
        self.jobs[jid] = job
        self.events[jid] = []
        self.event(jid, "info", "message", f"Created fine-tuning job: {jid}")
        return 200, job

    def event(self, jid: str, level: str, kind: str, message: str, data: dict | None = None) -> None:
        self.events[jid].append(
            {
                "id": f"ftevent-{next(self.ids):06d}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data or {},
                "type": kind,
            }
        )

    def advance(self, jid: str) -> None:
        """Each poll moves the job on: validating -> queued -> running (metrics) -> succeeded/failed."""
        job = self.jobs[jid]
        if job["status"] == "validating_files":
            job["status"] = "queued"
            self.event(jid, "info", "message", "Validating training file: " + job["training_file"])
        elif job["status"] == "queued":
            job["status"] = "running"
            self.event(jid, "info", "message", "Fine-tuning job started")
        elif job["status"] == "running":
            if self.fail_job:
                job["status"] = "failed"
                job["error"] = {
                    "code": "invalid_training_file",
                    "param": "training_file",
                    "message": "The job failed due to an invalid training file.",
                }
                self.event(jid, "error", "message", job["error"]["message"])
                return
            for step in range(1, self.steps + 1):
                self.event(
                    jid,
                    "info",
                    "metrics",
                    f"Step {step}/{self.steps}: training loss={1.0 / step:.4f}",
                    {"step": step, "total_steps": self.steps, "train_loss": 1.0 / step},
                )
            job["status"] = "succeeded"
            job["finished_at"] = int(time.time())
            job["trained_tokens"] = len(self.files[job["training_file"]]["content"])
            suffix = job["user_provided_suffix"] or "none"
            job["fine_tuned_model"] = f"ft:{job['model']}:org-test:{suffix}:{jid[-6:]}"
            self.event(jid, "info", "message", "The job has successfully completed")


def make_route(api: FakeOpenAI):
    """The fine-tuning API's routes over the shared loopback (which checks the key and writes the JSON)."""

    def route(method: str, path: str, headers, raw: bytes) -> tuple[int, dict]:
        api.requests.append((method, path))
        if method == "POST":
            if path == "/v1/files":
                ctype = headers.get("Content-Type", "")
                if not ctype.startswith("multipart/form-data"):
                    return openai_error(400, "expected multipart/form-data", None)
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + raw
                )
                fields = {}
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    payload = part.get_payload(decode=True)
                    fields[name] = (payload, part.get_filename()) if part.get_filename() else payload.decode()
                return api.upload(fields)
            if path == "/v1/fine_tuning/jobs":
                return api.create_job(json.loads(raw))
            return openai_error(404, f"Unknown request URL: POST {path}", "unknown_url")
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["v1", "fine_tuning", "jobs"] and len(parts) >= 4 and parts[3] in api.jobs:
            jid = parts[3]
            if len(parts) == 4:
                api.advance(jid)
                return 200, api.jobs[jid]
            if parts[4] == "events":
                data = list(reversed(api.events[jid]))  # newest first, as the API lists them
                return 200, {"object": "list", "data": data, "has_more": False}
        return openai_error(404, f"Unknown request URL: GET {path}", "unknown_url")

    return route


@pytest.fixture
def fake_openai(monkeypatch):
    def start(**kwargs) -> FakeOpenAI:
        api = FakeOpenAI(**kwargs)
        server = OpenAILoopback(make_route(api), key=KEY)
        servers.append(server)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        return api

    servers: list[OpenAILoopback] = []
    yield start
    for s in servers:
        s.close()


def needles(argv: list[str], capsys) -> tuple[int, str, str]:
    """`needles <argv>` through the real CLI (parser, error printer, exit code)."""
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def data_args(model, n: int = 12) -> list[str]:
    return [
        "--model",
        str(model),
        "--num-samples",
        str(n),
        "--lengths",
        "128",
        "--eval-metadata",
        json.dumps(EVAL_META),
    ]


def test_export_openai_writes_valid_chat_finetuning_jsonl(smollm2_dir, tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    code, stdout, err = needles(["export-openai", *data_args(smollm2_dir), "-o", str(path)], capsys)
    assert code == 0, err
    stats = json.loads(stdout)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == stats["examples"] == 12 and stats["eval_docs_checked"] == 4
    for row in rows:
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": SYSTEM_MESSAGE}
        assert user["role"] == "user" and user["content"].startswith("Do a task using the list of dictionaries below.")
        assert assistant["role"] == "assistant" and assistant["weight"] == 1
        assert assistant["content"].startswith("The value of key ") and "Dictionary [" in assistant["content"]
    assert 0 < stats["max_example_tokens"] <= stats["token_limit"] == 16385
    # fewer than 10 examples are refused before anything is written
    small = tmp_path / "small.jsonl"
    code, _, err = needles(["export-openai", *data_args(smollm2_dir, 9), "-o", str(small)], capsys)
    assert code == 2 and "fewer than 10 examples" in err and not small.exists()


def test_validation_names_every_broken_rule():
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
    validate_rows([good] * 10)
    bad = [
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        {"prompt": "q", "completion": "a"},
        {"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "a"}]},
    ]
    with pytest.raises(NeedlesError) as info:
        validate_rows([good] * 10 + bad, max_tokens=100)
    text = str(info.value)
    for rule in (
        "unrecognised role",
        "weight must be 0 or 1",
        "without an assistant message",
        "non-string content",
        "without a messages list",
        "over the 100-token limit",
    ):
        assert rule in text


def test_openai_backend_uploads_creates_polls_and_prints_the_model(fake_openai, smollm2_dir, tmp_path, capsys):
    api = fake_openai()
    out = tmp_path / "openai"
    argv = [
        "finetune",
        "--backend",
        "openai",
        *data_args(smollm2_dir),
        "-o",
        str(out),
        "--openai-model",
        "gpt-4o-mini-2024-07-18",
        "--n-epochs",
        "3",
        "--suffix",
        "kv",
        "--poll-interval",
        "0.01",
    ]
    code, stdout, err = needles(argv, capsys)
    assert code == 0, err
    job_id = next(iter(api.jobs))
    assert stdout.strip() == f"ft:gpt-4o-mini-2024-07-18:org-test:kv:{job_id[-6:]}"
    # what the server received: the exported file, byte for byte, and the job parameters
    uploaded = next(iter(api.files.values()))["content"]
    assert uploaded == (out / "openai_train.jsonl").read_bytes()
    assert len(uploaded.splitlines()) == 12
    job = api.jobs[job_id]
    assert job["model"] == "gpt-4o-mini-2024-07-18" and job["hyperparameters"]["n_epochs"] == 3
    assert job["method"]["type"] == "supervised"
    assert ("GET", f"/v1/fine_tuning/jobs/{job_id}") in api.requests
    assert any(p.startswith(f"/v1/fine_tuning/jobs/{job_id}/events") for _, p in api.requests)
    assert "Fine-tuning job started" in err  # progress shows the job's events
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fine_tuned_model"] == stdout.strip() and manifest["job_id"] == job_id
    assert manifest["data"]["documents"] == 12 and manifest["leakage_check"]["overlap"] == 0
    assert "openai-chat-completions" in manifest["eval_command"] and stdout.strip() in manifest["eval_command"]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("bad_key", "HTTP 401"),
        ("failed_job", "failed: The job failed due to an invalid training file."),
        ("bad_model", "not available for fine-tuning"),
        ("no_key", "OPENAI_API_KEY"),
    ],
)
def test_openai_backend_errors_are_clear(case, expect, fake_openai, smollm2_dir, tmp_path, capsys, monkeypatch):
    fake_openai(fail_job=case == "failed_job")
    if case == "bad_key":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    if case == "no_key":
        monkeypatch.delenv("OPENAI_API_KEY")
    model = "gpt-nonexistent" if case == "bad_model" else "gpt-3.5-turbo-1106"
    argv = [
        "finetune",
        "--backend",
        "openai",
        *data_args(smollm2_dir),
        "-o",
        str(tmp_path / "o"),
        "--openai-model",
        model,
        "--poll-interval",
        "0.01",
    ]
    code, _, err = needles(argv, capsys)
    assert code == 2 and expect in err and "fix:" in err
