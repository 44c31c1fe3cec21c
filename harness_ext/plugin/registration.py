"""What the plugin changes inside lm-eval, all idempotent.

* ``TaskManager`` also indexes this plugin's task folder (precedence: lm-eval built-ins <
  this plugin < the user's ``--include_path``), so plain ``lm_eval --tasks kv_retrieval`` works,
  and reads its index of lm-eval's own folder from a disk cache (``task_index_cache``).
* ``generate_until`` of the vLLM and HF backends refuses, before generating, any prompt of this
  plugin's tasks that does not fit the model with ``max_gen_toks`` (lm-eval would silently
  truncate it from the left, which destroys a long-context score); ``loglikelihood`` likewise
  refuses a context + continuation that does not fit ``max_length``.
* A :class:`NeedlesError` reaching the top of a program prints as a message, not a traceback.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

from harness_ext.core.errors import NeedlesError, debug, print_error

_MARK = "_needles_patched"
_log = logging.getLogger("lm_eval.tasks._index")  # the override warning reads as lm-eval's own


def tasks_dir() -> Path:
    """The folder lm-eval scans for this plugin's task YAMLs."""
    # Located, not imported: the library never imports the task folders (they import it).
    spec = importlib.util.find_spec("kv_tasks")
    if spec is None or not spec.submodule_search_locations:
        raise NeedlesError(
            "the kv_tasks package is not installed", fix="reinstall lm-eval-needles (bash scripts/setup.sh)"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


@functools.lru_cache(maxsize=1)
def plugin_task_names() -> frozenset[str]:
    names = set()
    for yml in tasks_dir().rglob("*.yaml"):
        for line in yml.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^task:\s*([A-Za-z0-9_\-]+)\s*$", line)
            if m:
                names.add(m.group(1))
    return frozenset(names)


def _with_plugin_path(include_path):
    ours = str(tasks_dir())
    paths = (
        []
        if include_path is None
        else list(include_path)
        if isinstance(include_path, (list, tuple))
        else [include_path]
    )
    if any(os.path.realpath(str(p)) == ours for p in paths):
        return include_path
    return [ours, *paths]


def patch_task_manager(module) -> None:
    cls = module.TaskManager
    if getattr(cls, _MARK, False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        original(self, verbosity, _with_plugin_path(include_path), include_defaults, metadata)
        self.include_path = include_path  # report what the user passed, not our addition

    cls.__init__ = __init__
    setattr(cls, _MARK, True)
    _cache_builtin_index(module.TaskIndex, Path(module.__file__).parent)
    install_excepthook()


def _cache_builtin_index(index_cls, builtin: Path) -> None:
    """``TaskIndex.build`` takes lm-eval's own folder (always first when present) from the disk cache."""
    from lm_eval import __version__

    from harness_ext.plugin.task_index_cache import cached_index

    original = index_cls.build

    def build(paths, *, resolve_includes=True):
        paths = list(paths)
        if not resolve_includes or not paths or Path(paths[0]) != builtin:
            return original(paths, resolve_includes=resolve_includes)
        index = dict(cached_index(builtin, __version__, original))
        for name, entry in (original(paths[1:]) if len(paths) > 1 else {}).items():
            if name in index:  # lm-eval's own merge rule and warning: later paths override
                _log.warning(
                    "Task '%s' from %s overrides existing task from %s", name, entry.yaml_path, index[name].yaml_path
                )
            index[name] = entry
        return index

    build.__wrapped__ = original
    index_cls.build = staticmethod(build)


# ------------------------------------------------------------------------------ length guard
def check_prompt_lengths(lm, requests) -> None:
    """Raise if a plugin task's prompt plus ``max_gen_toks`` exceeds the model's context: ``max_length``
    (vLLM's max_model_len) or, when shorter, the RoPE window the model is served with."""
    from harness_ext.plugin.rope_guard import fix_for, served_window

    ours = plugin_task_names()
    limit = int(lm.max_length)
    rope_window, served = served_window(lm)
    by_rope = rope_window is not None and rope_window < limit
    limit = rope_window if by_rope else limit
    worst: dict[str, tuple[int, int, int]] = {}  # task -> (count, longest prompt, gen tokens)
    for req in requests:
        task = getattr(req, "task_name", None)
        if task not in ours:
            continue
        context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {}) or {}
        gen = int(gen_kwargs.get("max_gen_toks", getattr(lm, "max_gen_toks", 256)))
        n = len(lm.tok_encode(context))
        if n + gen > limit:
            count, longest, _ = worst.get(task, (0, 0, gen))
            worst[task] = (count + 1, max(longest, n), gen)
    if worst:
        what = "RoPE window" if by_rope else "model limit"
        lines = [
            f"task {t}: {c} prompt(s) do not fit; longest {n} tokens + max_gen_toks {g} = {n + g} > {what} {limit}"
            for t, (c, n, g) in sorted(worst.items())
        ]
        need = max(n + g for _, n, g in worst.values())
        fix = "lower the target lengths (e.g. --metadata '{\"lengths\": [2048]}') or raise max_model_len / max_length"
        if by_rope or (rope_window is not None and need > rope_window):  # more room needs a RoPE extension
            fix = fix_for(served, need)
        elif rope_window is not None:
            fix += f" in --model_args (the served RoPE window holds {rope_window})"
        else:
            fix += " in --model_args if the model supports a longer context"
        raise NeedlesError(
            "prompts longer than the model's context (lm-eval would silently cut them from the left):\n  "
            + "\n  ".join(lines),
            fix=fix,
        )


def check_loglikelihood_lengths(lm, requests) -> None:
    """Raise if a plugin task's context plus continuation exceeds ``max_length`` (lm-eval would cut the context
    from the left, so the loss would be measured after fewer tokens than the row says), or if the continuation
    lm-eval scores is not the row's ``continuation_tokens`` (per-token scores divide by it). The RoPE window is
    no limit on backends that compute positions past it (a loss curve past it is what a context-length sweep
    measures), but it is on vLLM: its rotary table ends at the served window, and past it every log-likelihood
    comes back NaN."""
    from harness_ext.plugin.rope_guard import vllm_window

    ours = plugin_task_names()
    limit = int(lm.max_length)
    window = vllm_window(lm)
    if window is not None and window < limit:
        limit = window
    over: dict[str, tuple[int, int]] = {}  # task -> (count, longest request)
    miscounted: list[str] = []
    for req in requests:
        task = getattr(req, "task_name", None)
        if task not in ours or not req.args[0]:
            continue
        context_enc, continuation_enc = lm._encode_pair(req.args[0], req.args[1])
        n = len(context_enc) + len(continuation_enc)
        if n > limit:
            count, longest = over.get(task, (0, 0))
            over[task] = (count + 1, max(longest, n))
        expected = req.doc.get("continuation_tokens") if isinstance(req.doc, dict) else None
        if expected is not None and len(continuation_enc) != expected and len(miscounted) < 3:
            miscounted.append(f"task {task}: lm-eval scores {len(continuation_enc)} tokens, the row says {expected}")
    if over and limit == window:
        lines = [f"task {t}: {c} request(s) past vLLM's RoPE window; longest {n} tokens > {window}" for t, (c, n) in
                 sorted(over.items())]  # fmt: skip
        raise NeedlesError(
            "requests past the RoPE window vLLM serves (its log-likelihoods there are NaN, not a loss):\n  "
            + "\n  ".join(lines),
            fix="score the unextended model past its window with --model hf (transformers computes every position), "
            "or serve it extended (hf_overrides), or keep the context lengths inside the window",
        )
    if over:
        lines = [f"task {t}: {c} request(s) do not fit; longest {n} tokens > model limit {limit}" for t, (c, n) in
                 sorted(over.items())]  # fmt: skip
        raise NeedlesError(
            "requests longer than the model's context (lm-eval would silently cut them from the left):\n  "
            + "\n  ".join(lines),
            fix="lower the context lengths (e.g. --metadata '{\"long_ppl_contexts\": [1024, 2048]}') or raise "
            "max_length (hf) / max_model_len (vllm) in --model_args",
        )
    if miscounted:
        raise NeedlesError(
            "the backend tokenizes the continuation differently from the task's tokenizer:\n  "
            + "\n  ".join(miscounted),
            fix="pass the evaluated model's own tokenizer (--model_args tokenizer=...) so the rows are cut with it",
        )


def patch_generation(module) -> None:
    from harness_ext.plugin.rope_guard import patch_vllm_init

    if getattr(module, "VLLM", None) is not None:
        patch_vllm_init(module.VLLM)  # refuses a max_model_len past the served RoPE window before the engine starts
    for cls_name in ("VLLM", "HFLM"):
        cls = getattr(module, cls_name, None)
        if cls is None or getattr(cls.generate_until, _MARK, False):
            continue
        original = cls.generate_until

        @functools.wraps(original)
        def generate_until(self, requests, *args, _original=original, **kwargs):
            check_prompt_lengths(self, requests)
            return _original(self, requests, *args, **kwargs)

        setattr(generate_until, _MARK, True)
        cls.generate_until = generate_until
        if not getattr(cls.loglikelihood, _MARK, False):
            scoring = cls.loglikelihood

            @functools.wraps(scoring)
            def loglikelihood(self, requests, *args, _original=scoring, **kwargs):
                check_loglikelihood_lengths(self, requests)
                return _original(self, requests, *args, **kwargs)

            setattr(loglikelihood, _MARK, True)
            cls.loglikelihood = loglikelihood
    install_excepthook()


# ------------------------------------------------------------------------------ errors
def install_excepthook() -> None:
    if getattr(sys.excepthook, _MARK, False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if isinstance(exc, NeedlesError) and not debug():
            print_error(exc, leading_newline=True)
            return
        previous(exc_type, exc, tb)

    setattr(hook, _MARK, True)
    sys.excepthook = hook
