"""``needles scorecard MODEL --base-url URL``: the scorecard of a model behind an OpenAI-compatible endpoint (a
``vllm serve``, an inference provider), scored by lm-eval's ``local-chat-completions`` model class.

What runs over an endpoint, and what is refused (docs/scorecard.md, "An OpenAI-compatible endpoint"):

- chat completions only: every task of the suite is ``generate_until`` (the server applies the model's chat
  template to the messages ``--apply_chat_template`` sends, as vLLM does in-process). A task that needs
  ``loglikelihood`` would need prompt logprobs (``local-completions`` with ``echo``), which chat endpoints do not
  give: it is refused before anything runs (the suite has none today; the check keeps it so);
- exact lengths need the served model's tokenizer on this machine: the tasks size every prompt with it (``--tokenizer``,
  or MODEL itself when it is a local folder, the name ``vllm serve FOLDER`` gives the model). None, or one that is
  not on disk (or in the hub cache: lm_eval runs offline), is refused: lengths counted with another tokenizer would
  put every point of the curve at the wrong place;
- the window: ``--max-model-len``, else the tokenizer folder's config.json (its RoPE window, capped by the
  tokenizer's model_max_length), else the tokenizer's model_max_length; checked against the ``max_model_len`` the
  endpoint reports on ``GET /models`` (vLLM does), where a smaller served window is refused with the flag to pass;
- the API key: ``OPENAI_API_KEY`` from the environment (lm-eval's ``local-chat-completions`` reads it there), never
  a flag, never in a URL, never written to any output (commands, logs, plan, scorecard).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from harness_ext.core.errors import NeedlesError

KEY_ENV = "OPENAI_API_KEY"  # where lm-eval's local-chat-completions reads the key
MODEL_TYPE = "local-chat-completions"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
URL_FIX = "pass the endpoint's base URL, the part before /chat/completions, e.g. --base-url http://localhost:8000/v1"
TOKENIZER_FIX = (
    "pass --tokenizer FOLDER_OR_HUB_ID: the tokenizer of the served model (e.g. the folder given to `vllm serve`; "
    "a hub id must be downloaded first: huggingface-cli download ORG/NAME)"
)


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # normalised: no trailing slash, no /chat/completions
    model: str  # the name the server gives the model (the request's "model")
    tokenizer: str  # a local folder (absolute) or a cached hub id

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def models_url(self) -> str:
        return self.base_url + "/models"

    def describe(self) -> dict:
        """What the scorecard records about the endpoint (no key: it never leaves the environment)."""
        return {"base_url": self.base_url, "model": self.model, "tokenizer": self.tokenizer, "model_type": MODEL_TYPE}


def base_url(url: str) -> str:
    """The endpoint's base URL as the ``openai`` client takes it (``.../v1``); a full chat-completions URL is
    accepted too. Refused: no http(s) scheme, a key in the URL, no path (a bare host), the legacy completions URL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise NeedlesError(f"--base-url {url!r} is not an http(s) URL", fix=URL_FIX)
    if parts.username or parts.password:
        raise NeedlesError(
            "--base-url carries credentials (user:password@host)",
            fix=f"drop them from the URL and export {KEY_ENV} instead (the key is read from the environment only)",
        )
    if parts.path.strip("/") == "":
        # the openai client and lm-eval append /chat/completions to what they are given: a bare host would miss /v1
        raise NeedlesError(f"--base-url {url} has no path (OpenAI-compatible servers answer under /v1)", fix=URL_FIX)
    text = url.strip().rstrip("/")
    if text.endswith("/chat/completions"):
        text = text[: -len("/chat/completions")]
    elif text.endswith("/completions"):
        raise NeedlesError(
            f"--base-url {url} is a (legacy) completions URL; the scorecard talks to chat completions", fix=URL_FIX
        )
    return text


def _no_comma(value: str, what: str) -> str:
    # lm-eval splits --model_args on commas: a comma inside a value would silently become another argument
    if "," in value:
        raise NeedlesError(
            f"{what} {value!r} holds a comma, which lm-eval's --model_args cannot carry",
            fix=f"use a {what} without commas",
        )
    return value


def resolve_tokenizer(model: str, tokenizer: str | None) -> str:
    """The tokenizer that sizes the prompts: ``--tokenizer``, else MODEL when it is a local folder with tokenizer
    files; checked on disk (or in the hub cache) before anything runs."""
    if tokenizer is None:
        folder = Path(model).expanduser()
        if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return str(folder.resolve())
        raise NeedlesError(
            f"no tokenizer for the endpoint model {model!r}: the scorecard sizes every prompt to an exact token length "
            "with the served model's tokenizer, on this machine",
            fix=TOKENIZER_FIX,
        )
    folder = Path(tokenizer).expanduser()
    if folder.exists() or tokenizer.startswith(("/", "~", ".")):
        if not folder.is_dir():
            raise NeedlesError(f"no such tokenizer folder: {tokenizer}", fix=TOKENIZER_FIX)
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise NeedlesError(
                f"tokenizer folder {tokenizer} holds none of {', '.join(TOKENIZER_FILES)}", fix=TOKENIZER_FIX
            )
        return str(folder.resolve())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(tokenizer, f), str) for f in TOKENIZER_FILES)
    except Exception:  # noqa: BLE001 - not a valid hub id either: same answer
        cached = False
    if not cached:
        raise NeedlesError(
            f"tokenizer {tokenizer!r} is neither a local folder nor a downloaded hub id (lm_eval runs offline)",
            fix=TOKENIZER_FIX,
        )
    return tokenizer


def make_endpoint(url: str, model: str, tokenizer: str | None) -> Endpoint:
    """Every endpoint option checked (no request yet: ``check_endpoint`` makes the first)."""
    return Endpoint(_no_comma(base_url(url), "--base-url"), _no_comma(model, "model name"),
                    _no_comma(resolve_tokenizer(model, tokenizer), "tokenizer"))  # fmt: skip


def check_generation_tasks(tasks: list[str]) -> None:
    """Refuse tasks a chat endpoint cannot score: only ``generate_until`` gets an answer from chat completions."""
    from harness_ext.plugin.registration import tasks_dir

    types: dict[str, str] = {}
    for path in tasks_dir().rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        # top-level keys only ("task: NAME", not a group's task list); a task without the key generates (lm-eval's
        # default for these folders)
        name = re.search(r"(?m)^task:[ \t]*([^\s#]+)", text)
        kind = re.search(r"(?m)^output_type:[ \t]*([^\s#]+)", text)
        if name and kind:
            types[name.group(1)] = kind.group(1)
    bad = [f"{t} ({types[t]})" for t in tasks if types.get(t, "generate_until") != "generate_until"]
    if bad:
        raise NeedlesError(
            f"a chat-completions endpoint cannot score {', '.join(bad)}: they need prompt log-probabilities",
            fix="score those tasks with vLLM (needles scorecard MODEL_FOLDER, no --base-url), or leave them out",
        )


def _auth_headers() -> dict[str, str]:
    key = os.environ.get(KEY_ENV, "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_endpoint(endpoint: Endpoint, window: int, timeout: float = 15.0) -> dict:
    """``GET BASE/models`` before anything else runs: the server answers, the key is accepted, it serves the model,
    and its ``max_model_len`` (where it reports one) holds the planned window. Returns what it learnt."""
    request = urllib.request.Request(endpoint.models_url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - the scheme is checked
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            said = "no key was sent" if not os.environ.get(KEY_ENV) else f"the key in {KEY_ENV} was refused"
            raise NeedlesError(
                f"the endpoint {endpoint.base_url} answered HTTP {exc.code} ({said})",
                fix=f"export {KEY_ENV}=<your key> (read from the environment only, never written to any output)",
            ) from None
        if exc.code in (404, 405):  # a server without a model list: the first request will tell
            return {"models": None, "max_model_len": None}
        raise NeedlesError(
            f"the endpoint {endpoint.base_url} answered HTTP {exc.code} to GET /models", fix="check the server's log"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NeedlesError(
            f"cannot reach the endpoint {endpoint.base_url} (GET /models: {reason})",
            fix="start the server (e.g. `vllm serve MODEL --max-model-len N`) or correct --base-url (the part "
            "before /chat/completions, e.g. http://localhost:8000/v1)",
        ) from None
    entries = [m for m in body.get("data") or [] if isinstance(m, dict)] if isinstance(body, dict) else []
    ids = [str(m.get("id")) for m in entries]
    if ids and endpoint.model not in ids:
        raise NeedlesError(
            f"the endpoint {endpoint.base_url} serves {', '.join(ids)}, not {endpoint.model!r}",
            fix="pass the name the server gives the model as MODEL (vLLM: --served-model-name, else the path it loaded)",
        )
    served = next((m.get("max_model_len") for m in entries if m.get("id") == endpoint.model), None)
    if isinstance(served, int) and served < window:
        raise NeedlesError(
            f"the endpoint serves {endpoint.model} with max_model_len {served}, below the planned window {window}",
            fix=f"pass --max-model-len {served} (or serve a longer window)",
        )
    return {"models": ids or None, "max_model_len": served if isinstance(served, int) else None}
