"""A run's output folder: one run at a time, no silent overwrite of a finished run, checkpoints for --resume.

Exclusive use is an OS file lock (``fcntl.lockf``) on ``.needles-finetune.lock``: process N of
a run locks byte N, so the ranks of one ``accelerate launch`` share the folder and a second run
collides on every rank alike (no rank waits for another that already gave up). The lock goes
away with the process, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from harness_ext.core.atomic_io import write_json_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.core.rope import RUN_MANIFEST

MANIFEST = RUN_MANIFEST  # the scorers read it beside an adapter (harness_ext.core.rope.trained_overrides)
LOCK_FILE = ".needles-finetune.lock"
STATE_FILE = "needles_state.json"
# options that may change between a run and its --resume (outputs and checkpointing only)
RESUMABLE_OPTIONS = (
    "output_dir",
    "resume",
    "stop_after_steps",
    "save_every",
    "keep_checkpoints",
    "merge",
    "log_every",
    "report_to",  # where logs go, not what is trained
)
# options that say what the run's documents are checked against, not what it trains: the leakage check runs again
# on every start, so a resume may check against another suite
NOT_TRAINING = ("eval_tasks", "eval_metadata")
# memory and speed only: the same steps give the same weights with gradient checkpointing or without (tested), so
# a run may resume with it turned on where a batch does not fit; hashed at their defaults
MEMORY_OPTIONS = ("gradient_checkpointing", "gradient_checkpointing_above")


class OutputLock:
    """Exclusive use of an output folder by one run (all of its processes)."""

    def __init__(self, out: Path, rank: int = 0):
        self.out, self.rank, self._file = Path(out), rank, None

    def acquire(self) -> OutputLock:
        from harness_ext.core.output_files import check_output_dir as check_writable

        check_writable(self.out, "output folder")
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): nothing to hold
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / LOCK_FILE, "a+b")  # noqa: SIM115 - held until release()
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.rank)
        except OSError:
            self._file.close()
            self._file = None
            raise NeedlesError(
                f"{self.out} is in use by another finetune run",
                fix="wait until that run ends, or pass another --output-dir",
            ) from None
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse to start over a finished run or over another run's checkpoints (unless resuming)."""
    from harness_ext.core.output_files import check_output_dir as check_writable

    check_writable(out, "output folder")
    if resume:
        return
    if (Path(out) / MANIFEST).is_file():
        raise NeedlesError(
            f"{out} already holds a finished run ({MANIFEST})",
            fix="pass another --output-dir (or delete that folder to redo the run)",
        )
    if list_checkpoints(out):
        raise NeedlesError(f"{out} already holds checkpoints of a run", fix="pass --resume or use a new --output-dir")


def config_fingerprint(cfg: Any, strict: bool = False) -> str:
    """What must not change between a run and its --resume: outputs, checkpointing, the evaluation sets the documents
    are checked against and the memory options may. ``strict``: only outputs and checkpointing may (the rule older
    checkpoints were written with)."""
    d = dataclasses.asdict(cfg)
    for key in RESUMABLE_OPTIONS if strict else RESUMABLE_OPTIONS + NOT_TRAINING:
        d.pop(key)
    if not strict:
        defaults = type(cfg)()
        d.update({key: getattr(defaults, key) for key in MEMORY_OPTIONS})
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def resumable_fingerprints(cfg: Any) -> tuple[str, ...]:
    """The fingerprints a checkpoint that ``cfg`` may resume carries: :func:`config_fingerprint`, or the strict one
    (what older checkpoints carry: they resume with the same evaluation and memory options)."""
    return config_fingerprint(cfg), config_fingerprint(cfg, strict=True)


def latest_state(
    out: Path, fingerprints: tuple[str, ...], processes: int = 1, data_sha256: str | None = None
) -> tuple[Path, dict]:
    """The newest checkpoint and its state, refused when missing, written with another configuration, on other
    training data (the same options can make other documents once a data family's generator or files change) or
    by another number of processes (the micro-batch plan and the per-process states depend on it)."""
    found = list_checkpoints(out)
    if not found:
        raise NeedlesError(
            f"--resume: no checkpoint under {Path(out) / 'checkpoints'}",
            fix="run without --resume (and with --save-every N) first",
        )
    state = json.loads((found[-1] / STATE_FILE).read_text())
    if state["config_fingerprint"] not in fingerprints:
        raise NeedlesError(
            f"--resume: {found[-1]} was written with another configuration",
            fix="resume with the same training options (output, checkpoint, --eval-* and --gradient-checkpointing* "
            "options may change)",
        )
    trained_on = state.get("data_sha256")  # checkpoints from before this key was written do not say
    if data_sha256 and trained_on and trained_on != data_sha256:
        raise NeedlesError(
            f"--resume: {found[-1]} was trained on other documents (data_sha256 {trained_on[:12]}; the same options "
            f"make {data_sha256[:12]} now: the data family's generator or its files changed)",
            fix="start again without --resume in a new --output-dir (or delete this run's checkpoints)",
        )
    saved = state.get("processes", 1)  # checkpoints from before this key was written came from one process
    if saved != processes:
        raise NeedlesError(
            f"--resume: {found[-1]} was written by {saved} process(es), this run has {processes}",
            fix=f"resume with the same number of processes (accelerate launch --num_processes {saved})",
        )
    return found[-1], state


def save_checkpoint(
    accelerator: Any, out: Path, step: int, history: list[dict], fingerprint: str, keep: int, data_sha256: str
) -> None:
    """accelerate's full training state plus our step/history; only the newest ``keep`` are kept.

    The state file marks a checkpoint complete, so rank 0 writes it only once every process has
    written its share (save_state has no barrier of its own: each rank saves its RNG states)."""
    path = Path(out) / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "history": history, "config_fingerprint": fingerprint, "data_sha256": data_sha256}
        write_json_atomic(path / STATE_FILE, {**state, "processes": accelerator.num_processes})
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_restored(path: Path, model: Any) -> None:
    """strict=False must not hide a checkpoint that lacks trainable weights (plain, non-sharded saves)."""
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        return  # FSDP / DeepSpeed write their own (sharded) formats and load them strictly
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if missing:
        raise NeedlesError(
            f"--resume: {path} lacks {len(missing)} trained tensors (e.g. {missing[0]})",
            fix="resume from a checkpoint of the same run, or start again without --resume",
        )


def save_only_trainable(accelerator: Any) -> None:
    """LoRA checkpoints keep only the adapter weights (the frozen base is not copied each time)."""

    def pre_save(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            if i < len(weights):
                keep = {n for n, p in model.named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    accelerator.register_save_state_pre_hook(pre_save)
