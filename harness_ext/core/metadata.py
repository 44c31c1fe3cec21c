"""Reading a task's ``--metadata``: flags as booleans, and unknown keys refused with the closest valid name.

lm-eval merges the user's ``--metadata`` JSON with its own model/run keys and hands the union to the
dataset function, so a misspelt key would otherwise be ignored silently and the task would run on
its defaults while the user believes otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import sys
from collections.abc import Iterable, Mapping

from harness_ext.core.errors import NeedlesError

# Keys lm-eval itself puts into a task's metadata (model_args, run settings) or the YAML's own.
LM_EVAL_KEYS = frozenset(
    {
        "version",
        "pretrained",
        "tokenizer",
        "model",
        "trust_remote_code",
        "revision",
        "dtype",
        "max_length",
        "max_model_len",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "data_parallel_size",
        "batch_size",
        "max_batch_size",
        "device",
        "seed",
        "add_bos_token",
        "lora_local_path",
        "peft",
        "enforce_eager",
        "base_url",
        "num_concurrent",
        "tokenized_requests",
        "tokenizer_backend",
        "parallelize",
        "use_fast_tokenizer",
        "max_gen_toks",
        "think_end_token",
        "enable_thinking",
        "chat_template_args",
        "swap_space",
        "quantization",
        "kv_cache_dtype",
        "allow_unofficial_data",
        "config_source",  # lm-eval's task factory adds it to every task's metadata
    }
)
# Keys the plugin itself writes into a task's metadata (data hashes, labels): a rebuilt task sees them again.
PLUGIN_INFO_PREFIX = "needles_"
# Prefixes that mark a key as meant for a plugin family: such a key is never passed on as a model argument.
FAMILY_PREFIXES = ("mdqa_", "flenqa_", "niah_", "synth_", "musique_", "summhay_")


def truthy(value: object) -> bool:
    """A metadata or environment flag: 1/true/yes/on (any case) are true, anything else false."""
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def model_arg_names() -> frozenset[str]:
    """``--model_args`` names of the lm-eval backends (and vLLM engine) loaded in this process.

    lm-eval merges ``--model_args`` into task metadata, and the vLLM backend passes unknown model args
    on to ``vllm.LLM``; a backend in use has been imported, so its signature is here to read.
    """
    names: set[str] = set()
    lm_api = sys.modules.get("lm_eval.api.model")
    base = getattr(lm_api, "LM", None)
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("lm_eval.models.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if inspect.isclass(obj) and base is not None and issubclass(obj, base):
                try:
                    names.update(inspect.signature(obj.__init__).parameters)
                except (TypeError, ValueError):
                    continue
    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    engine_args = getattr(arg_utils, "EngineArgs", None)
    if engine_args is not None and dataclasses.is_dataclass(engine_args):
        names.update(f.name for f in dataclasses.fields(engine_args))
    names.discard("self")
    return frozenset(names)


def backends_take_any_argument() -> bool:
    """Whether a loaded lm-eval backend forwards unknown ``--model_args`` (``**kwargs`` to the model loader)."""
    lm_api = sys.modules.get("lm_eval.api.model")
    base = getattr(lm_api, "LM", None)
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("lm_eval.models.") or mod is None or base is None:
            continue
        for obj in list(vars(mod).values()):
            if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == mod_name:
                try:
                    params = inspect.signature(obj.__init__).parameters.values()
                except (TypeError, ValueError):
                    continue
                if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                    return True
    return False


def check_keys(task: str, metadata: Mapping[str, object], own: Iterable[str], shared: Iterable[str] = ()) -> None:
    """Refuse a ``--metadata`` key that is neither the family's own, another plugin family's, nor lm-eval's.

    ``shared`` lists keys of the other plugin families: one ``--metadata`` JSON serves every task of
    a run (``--tasks kv_retrieval,mdqa20``), so an MDQA key must not fail a KV task. lm-eval merges
    ``--model_args`` into the same dictionary, and its backends forward unknown model args to the model
    loader; so a key no loaded backend names is refused only when it is plainly meant for us: it is
    close to one of our keys (a typo) or carries a family prefix, or no loaded backend forwards extras.
    """
    ours = set(own) | set(shared)
    known = ours | LM_EVAL_KEYS
    unknown = [k for k in metadata if k not in known and not k.startswith(("_", PLUGIN_INFO_PREFIX))]
    if unknown:
        unknown = [k for k in unknown if k not in model_arg_names()]
    forwarded = backends_take_any_argument() if unknown else False
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(ours), n=1, cutoff=0.75)
        if forwarded and not close and not key.startswith(FAMILY_PREFIXES):
            continue  # a model argument the backend passes on (attn_implementation=..., device_map=...)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        raise NeedlesError(
            f"task {task}: unknown --metadata key {key!r}",
            fix=f"{hint}valid keys of {task}: {', '.join(sorted(own))}",
        )


# ---------------------------------------------------------------------------------- typed values
def bad_value(key: str, value: object, problem: str, example: str) -> NeedlesError:
    """The error for one --metadata value: ``--metadata KEY=VALUE <problem>`` with an example as the fix."""
    return NeedlesError(f"--metadata {key}={value!r} {problem}", fix=f'e.g. "{key}": {example}')


def as_int(key: str, value: object, lo: int, hi: int, example: str) -> int:
    """An integer within ``lo..hi`` (a digit string counts: JSON from shell scripts often quotes numbers)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise bad_value(key, value, "is not an integer", example)
    if not lo <= int(value) <= hi:
        raise bad_value(key, value, f"is outside {lo}..{hi}", example)
    return int(value)


def as_list(key: str, value: object, example: str) -> list:
    """A non-empty list (a single number stands for a list of one)."""
    items = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise bad_value(key, value, "is not a non-empty list", example)
    return list(items)


def as_ints(key: str, value: object, lo: int, hi: int, example: str) -> tuple[int, ...]:
    """Sorted distinct integers within ``lo..hi``."""
    return tuple(sorted({as_int(key, v, lo, hi, example) for v in as_list(key, value, example)}))


def as_distinct_lengths(key: str, value: object, lo: int, hi: int, example: str) -> tuple[int, ...]:
    """Token lengths within ``lo..hi`` in the given order; a repeated length is refused (it would be scored twice)."""
    got = tuple(as_int(key, v, lo, hi, example) for v in as_list(key, value, example))
    if len(set(got)) != len(got):
        raise bad_value(key, value, "repeats a length", example)
    return got


def as_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise NeedlesError(
            f"--metadata {key}={value!r} is not one of {list(choices)}", fix=f'e.g. "{key}": "{choices[0]}"'
        )
    return str(value)


def as_string(key: str, value: object, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_value(key, value, "is not a non-empty string", example)
    return value
