"""The evaluation suite every workflow scores: its tasks (each a target or a guard) and the experiment spec
that carries them (model, finetune values, lm-eval metadata, fixtures, statistics settings).

``needles experiment`` reads it from YAML (harness_ext.experiment.config); ``needles study`` builds one per run
to plan its finetunes and estimate their cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROLES = ("target", "guard")
# fixtures the experiment can build before it starts (harness_ext.workflow.data_step), and their options
FIXTURE_OPTIONS = {
    "flenqa": ("ctx_sizes", "instances", "seed"),
    "mdqa": ("documents", "num_questions", "seed"),
    "musique": ("num_questions", "seed"),
    "summhay": ("num_documents", "seed"),
}


@dataclass(frozen=True)
class SuiteTask:
    """One entry of the suite: an lm-eval task or group, scored on one per-sample metric."""

    task: str
    role: str
    metric: str
    margin: float = 0.0  # guards: the largest drop tolerated, in the metric's units (0.01 = 1 point of accuracy)
    filter: str = "none"  # lm-eval filter whose per-sample values are compared
    label: str = ""  # how tables name it (default: the task)
    optional: bool = False  # run without it when its data cannot be had (said in the log, plan and comparison)

    @property
    def name(self) -> str:
        return self.label or self.task


@dataclass
class ExperimentConfig:
    name: str
    model: str
    suite: list[SuiteTask]
    finetune: dict = field(default_factory=dict)  # FinetuneConfig values; "recipe" names a packaged/YAML base
    metadata: dict = field(default_factory=dict)
    fixtures: dict = field(default_factory=dict)  # {"flenqa": {...}, "mdqa": {...}}: see FIXTURE_OPTIONS
    alpha: float = 0.05
    max_model_len: int = 4096
    bootstrap_iters: int = 10000
    seed: int = 0
    gen_kwargs: str | None = None  # lm_eval --gen_kwargs for both evaluations
    limit: int | None = None  # lm_eval --limit (a smoke run; the comparison is then on fewer documents)
    on_gpu: bool = False  # vLLM's GPU defaults instead of the CPU engine options
    reference: str | None = None  # a CSV of published numbers shown beside ours (leaderboards/...)
    in_distribution: dict = field(default_factory=dict)  # {documents, enabled}: harness_ext.workflow.in_distribution

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t.task for t in self.suite))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
