"""Resumable steps: each is one command recorded in a plan file, and finished only when its marker says so.

A step writes into its own folder; the marker ``steps/<name>.json`` is written atomically after the step
succeeded, so a crash mid-step leaves no marker and the step is redone from a clean folder on the next
run, while finished steps are skipped. ``plan.json`` lists every step with the exact command that
reproduces it, so any scheduler can run the steps one by one.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness_ext.core.atomic_io import write_json_atomic
from harness_ext.core.errors import NeedlesError


@dataclass
class Step:
    name: str
    command: list[str]  # what reproduces the step by hand
    run: Callable[[], dict]  # does the work; returns what the marker records
    folder: Path | None = None  # the step's outputs (cleaned before a redo)
    inputs: dict = field(default_factory=dict)
    keep_partial: bool = False  # a redo continues from what is there (finetuning resumes its checkpoints)
    same_command: bool = True  # a finished step counts only if it ran this very command


class StepRunner:
    """Runs steps in order, skipping those whose marker exists; records the plan and every marker."""

    def __init__(self, out: Path, log: Callable[[str], None] | None = None):
        self.out = Path(out)
        self.markers = self.out / "steps"
        self.log = log or (lambda msg: print(f"[needles experiment] {msg}", file=sys.stderr, flush=True))

    def marker(self, name: str) -> Path:
        return self.markers / f"{name}.json"

    def done(self, name: str) -> dict | None:
        path = self.marker(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # an unreadable marker is no proof: redo the step

    def write_plan(self, steps: list[Step], extra: dict) -> None:
        plan = {
            **extra,
            "steps": [
                {"name": s.name, "command": shlex.join(s.command), "folder": str(s.folder) if s.folder else None}
                for s in steps
            ],
        }
        write_json_atomic(self.out / "plan.json", plan)

    def run(self, steps: list[Step], first: int = 1, total: int | None = None) -> dict[str, dict]:
        """Run (or skip, when finished before) each step in order; ``first``/``total`` number them within a longer
        plan run a few steps at a time (the progress lines read ``3/6``, not ``1/1``)."""
        results: dict[str, dict] = {}
        total = total or len(steps)
        for i, step in enumerate(steps, first):
            finished = self.done(step.name)
            if finished is not None and step.same_command and finished.get("command") != shlex.join(step.command):
                raise NeedlesError(
                    f"step {step.name} in {self.out} finished with another command ({finished.get('command')}); "
                    "the config changed since",
                    fix=f"use a new output folder, or delete {self.marker(step.name)} (and its outputs) to redo it",
                )
            if finished is not None:
                self.log(f"{i}/{total} {step.name}: done before, skipped ({self.marker(step.name)})")
                results[step.name] = finished["outputs"]
                continue
            if step.folder is not None and step.folder.exists() and not step.keep_partial:
                shutil.rmtree(step.folder)  # half-written by an interrupted run: never trusted
            self.log(f"{i}/{total} {step.name}: {shlex.join(step.command)}")
            t = time.perf_counter()
            outputs = step.run()
            record = {
                "name": step.name,
                "command": shlex.join(step.command),
                "seconds": round(time.perf_counter() - t, 1),
                "outputs": outputs,
                "inputs": step.inputs,
            }
            write_json_atomic(self.marker(step.name), record)
            results[step.name] = outputs
        return results
