"""A loopback HTTP server speaking OpenAI's wire format, the one allowed mock (it stands in for the paid OpenAI API;
no network): JSON replies, OpenAI's error objects, the Bearer-key check, and a record of every request.

A test hands it ``route(method, path, headers, body) -> (status, reply dict)``; the server checks the key first
(when given one), records the request, and writes the reply. Used by the fine-tuning job tests (/v1/files,
/v1/fine_tuning/jobs) and the endpoint scorecard (/v1/models, /v1/chat/completions).
"""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

Route = Callable[[str, str, Message, bytes], tuple[int, dict]]
_ids = itertools.count(1)


@dataclass
class Request:
    method: str
    path: str
    headers: Message  # case-insensitive (httpx sends lower-case names)
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def error(status: int, message: str, code: str | None, param: str | None = None) -> tuple[int, dict]:
    """OpenAI's error object."""
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def chat_completion(model: str, content: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> dict:
    """A /v1/chat/completions reply with one choice, as the API (and vLLM) sends it."""
    return {
        "id": f"chatcmpl-{next(_ids):06d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def model_list(models: dict[str, int | None]) -> dict:
    """A /v1/models reply; a model's int is vLLM's ``max_model_len`` extension (None: the field is absent)."""
    data = []
    for name, window in models.items():
        entry = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "loopback"}
        data.append(entry if window is None else {**entry, "max_model_len": window})
    return {"object": "list", "data": data}


class OpenAILoopback:
    def __init__(self, route: Route, key: str | None = None):
        self.requests: list[Request] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = self.headers  # an email.message.Message: case-insensitive, as HTTP headers are
                outer.requests.append(Request(method, self.path, headers, body))
                if key is not None and headers.get("Authorization") != f"Bearer {key}":
                    return self.reply(*error(401, "Incorrect API key provided.", "invalid_api_key"))
                self.reply(*route(method, self.path, headers, body))

            def do_GET(self):  # noqa: N802 - http.server API
                self.handle_any("GET")

            def do_POST(self):  # noqa: N802 - http.server API
                self.handle_any("POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.base_url = self.url + "/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
