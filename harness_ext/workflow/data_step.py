"""The experiment's first step, ``data``: build the fixtures the config asks for, then check that every suite
task can get its data (a mirror, the cache or a verified download) before the base model is scored.

A missing file found here costs seconds; found by lm-eval it would cost the base evaluation and, for the
finetuned run, the training too. A suite task marked ``optional`` whose data cannot be had is left out of
the run (the log, ``plan.json`` and the comparison say which and why); any other stops the experiment with
the data source's own error and fix. The step's marker records the suite it settled on, so a resumed
experiment scores the same tasks as the run it continues, whatever the network does in between.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.data.qa_sources import MUSIQUE, SUMMHAY
from harness_ext.data.sources import ALLOW_UNOFFICIAL_KEY, FLENQA, LOST_IN_THE_MIDDLE, fetch
from harness_ext.workflow.suite import ExperimentConfig


def _flenqa_fixture(options: dict, folder: Path, metadata: dict) -> str:
    from harness_ext.tasklib.flenqa_fixture import write_fixture

    sizes = tuple(options.get("ctx_sizes", (250, 500, 1000)))
    write_fixture(folder, sizes, int(options.get("instances", 4)), int(options.get("seed", 0)))
    return FLENQA.mirror_key


def _mdqa_fixture(options: dict, folder: Path, metadata: dict) -> str:
    from harness_ext.tasklib.mdqa import ORACLE_FILE
    from harness_ext.tasklib.mdqa_fixture import build_fixture

    oracle = fetch(LOST_IN_THE_MIDDLE, ORACLE_FILE, metadata).path
    build_fixture(
        oracle,
        folder,
        seed=int(options.get("seed", 0)),
        settings=tuple(options.get("documents", (20,))),
        num_questions=options.get("num_questions"),
    )
    return LOST_IN_THE_MIDDLE.mirror_key


def _musique_fixture(options: dict, folder: Path, metadata: dict) -> str:
    from harness_ext.tasklib.qa_fixtures import write_musique_fixture

    write_musique_fixture(folder, int(options.get("num_questions", 24)), int(options.get("seed", 0)))
    return MUSIQUE.mirror_key


def _summhay_fixture(options: dict, folder: Path, metadata: dict) -> str:
    from harness_ext.tasklib.qa_fixtures import write_summhay_fixture

    write_summhay_fixture(folder, int(options.get("num_documents", 16)), int(options.get("seed", 0)))
    return SUMMHAY.mirror_key


_BUILDERS = {
    "flenqa": (_flenqa_fixture, FLENQA),
    "mdqa": (_mdqa_fixture, LOST_IN_THE_MIDDLE),
    "musique": (_musique_fixture, MUSIQUE),
    "summhay": (_summhay_fixture, SUMMHAY),
}


def prepare_data(cfg: ExperimentConfig, folder: Path, log: Callable[[str], None]) -> dict:
    """Build fixtures into ``folder``, check every suite task's data; returns the marker's record:
    the metadata the evaluations use, the suite names kept, and the skipped tasks with reason and fix."""
    metadata = dict(cfg.metadata)
    failed: dict[str, NeedlesError] = {}  # source name -> why its fixture could not be built
    fixtures = {}
    for name, options in cfg.fixtures.items():
        build, source = _BUILDERS[name]
        try:
            key = build(dict(options or {}), folder / name, cfg.metadata)
        except NeedlesError as e:
            failed[source.name] = e
            log(f"data: the {name} fixture cannot be built: {e.problem}")
            continue
        metadata[key] = str(folder / name)
        metadata[ALLOW_UNOFFICIAL_KEY] = True  # fixtures are marked non-official in every result
        fixtures[name] = str(folder / name)
    kept, skipped = [], []
    for entry in cfg.suite:
        problem = unavailable(entry.task, metadata, failed)
        if problem is None:
            kept.append(entry.name)
            continue
        if not entry.optional:
            raise problem
        skipped.append({"task": entry.name, "role": entry.role, "reason": problem.problem, "fix": problem.fix})
        log(f"data: {entry.name} ({entry.role}, optional) is left out: {problem.problem}")
    if not any(e.role == "target" and e.name in kept for e in cfg.suite):
        raise NeedlesError(
            f"experiment {cfg.name}: no target task has its data ({', '.join(s['task'] for s in skipped)})",
            fix=skipped[0]["fix"] if skipped else None,
        )
    return {"metadata": metadata, "suite": kept, "skipped": skipped, "fixtures": fixtures}


def unavailable(task: str, metadata: dict, failed: dict[str, NeedlesError]) -> NeedlesError | None:
    """Why ``task`` cannot get its data files (a fixture that failed, or the source's own error), or None."""
    from harness_ext.tasklib.data_needs import data_needs

    for source, relpath in data_needs(task, metadata):
        if source.name in failed:
            return failed[source.name]
        try:
            fetch(source, relpath, metadata)
        except NeedlesError as e:
            return e
    return None
