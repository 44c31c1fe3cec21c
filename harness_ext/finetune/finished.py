"""A finished run found in an output folder, checked against the run its config would train now.

`needles experiment` and `needles study` reuse a finetune whose folder holds a finished run when the step's marker is
missing (deleted to redo the step, or lost in a crash after the run). The same options can make other training
documents once a data family's generator or files change, so the run is reused only when its recorded options and
its documents' SHA-256 are what the config gives now; otherwise the step stops with the fix instead of scoring a
model trained on other data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.data import docs_sha256, prepare_docs
from harness_ext.finetune.manifest import hyperparameters
from harness_ext.finetune.modeling import load_base
from harness_ext.finetune.rundir import MANIFEST, MEMORY_OPTIONS, NOT_TRAINING, RESUMABLE_OPTIONS


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def finished_run(cfg: Any) -> dict | None:
    """The manifest of the finished run in ``cfg.output_dir`` (a FinetuneConfig), or None when there is none;
    refused when that run was trained with other options or on other documents than ``cfg`` makes now."""
    out = Path(cfg.output_dir)
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    fix = f"delete {out} to train again with the current config and data, or use a new output folder"
    recorded, now = _plain(manifest.get("hyperparameters", {})), _plain(hyperparameters(cfg))
    ignored = {*RESUMABLE_OPTIONS, *NOT_TRAINING, *MEMORY_OPTIONS}  # the leakage check runs again below
    changed = sorted(k for k in set(recorded) | set(now) if k not in ignored and recorded.get(k) != now.get(k))
    if changed:
        raise NeedlesError(f"{out} holds a finished run trained with other options ({', '.join(changed)})", fix=fix)
    base, _config, tokenizer = load_base(cfg)
    _spec, _tasks, docs, _leak = prepare_docs(cfg, tokenizer, base)
    trained_on, current = manifest.get("data", {}).get("data_sha256"), docs_sha256(docs)
    if trained_on != current:
        raise NeedlesError(
            f"{out} holds a finished run trained on other documents (data_sha256 {str(trained_on)[:12]}; the config "
            f"makes {current[:12]} now: the data family's generator or its files changed)",
            fix=fix,
        )
    return manifest


def finished_or_trained(cfg: Any) -> dict:
    """The manifest of ``cfg``'s run: the finished one in its folder (checked by :func:`finished_run`), else the
    run trained now, resuming from its folder's checkpoints when there are any."""
    import dataclasses

    from harness_ext.finetune.recipe import finetune
    from harness_ext.finetune.rundir import list_checkpoints

    if (manifest := finished_run(cfg)) is not None:
        return manifest
    return finetune(dataclasses.replace(cfg, resume=bool(list_checkpoints(Path(cfg.output_dir)))))
