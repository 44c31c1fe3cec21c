"""lm-eval's index of its own task folder comes from a disk cache that any change to the folder invalidates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.tasks._index import Kind, TaskIndex

from harness_ext.plugin.task_index_cache import _cache_file, cached_index

_TASK = "task: {name}\ninclude: _template\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: x\n"


@pytest.fixture
def counted_build():
    """lm-eval's real (unpatched) index builder, counting its calls."""
    calls: list[list[Path]] = []
    original = getattr(TaskIndex.build, "__wrapped__", TaskIndex.build)  # the plugin keeps lm-eval's own

    def build(paths, **kwargs):
        calls.append(list(paths))
        return original(paths, **kwargs)

    build.calls = calls
    return build


@pytest.fixture
def tasks_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEEDLES_NO_CACHE", raising=False)
    root = tmp_path / "tasks"
    (root / "fam").mkdir(parents=True)
    (root / "fam" / "_template").write_text("doc_to_target: gold\ntag: fam_tag\n")  # no .yaml suffix, as lm-eval's
    for name in ("a", "b"):
        (root / "fam" / f"{name}.yaml").write_text(_TASK.format(name=f"fam_{name}"))
    return root


def test_second_call_reads_the_cache_and_equals_a_fresh_build(tasks_folder, counted_build):
    first = cached_index(tasks_folder, "0.4.13", counted_build)
    second = cached_index(tasks_folder, "0.4.13", counted_build)
    assert len(counted_build.calls) == 1
    assert second == first == TaskIndex.build([tasks_folder])
    assert second["fam_a"].cfg["doc_to_target"] == "gold" and second["fam_tag"].kind == Kind.TAG


def test_editing_an_include_without_yaml_suffix_rebuilds(tasks_folder, counted_build):
    cached_index(tasks_folder, "0.4.13", counted_build)
    template = tasks_folder / "fam" / "_template"
    template.write_text("doc_to_target: changed\n")
    os.utime(template, ns=(1, 1))  # a different mtime even on a coarse-clock file system
    index = cached_index(tasks_folder, "0.4.13", counted_build)
    assert len(counted_build.calls) == 2
    assert index["fam_a"].cfg["doc_to_target"] == "changed" and "fam_tag" not in index


@pytest.mark.parametrize("change", ["new task", "removed task", "lm-eval upgraded", "NEEDLES_NO_CACHE", "damaged"])
def test_every_change_rebuilds(tasks_folder, counted_build, monkeypatch, change):
    cached_index(tasks_folder, "0.4.13", counted_build)
    version = "0.4.13"
    if change == "new task":
        (tasks_folder / "fam" / "c.yaml").write_text(_TASK.format(name="fam_c"))
    elif change == "removed task":
        (tasks_folder / "fam" / "b.yaml").unlink()
    elif change == "lm-eval upgraded":
        version = "0.4.14"
    elif change == "NEEDLES_NO_CACHE":
        monkeypatch.setenv("NEEDLES_NO_CACHE", "1")
    else:
        _cache_file(tasks_folder).write_bytes(b"not a pickle")
    index = cached_index(tasks_folder, version, counted_build)
    assert len(counted_build.calls) == 2
    assert index == TaskIndex.build([tasks_folder])
    monkeypatch.delenv("NEEDLES_NO_CACHE", raising=False)
    cached_index(tasks_folder, version, counted_build)
    assert len(counted_build.calls) == 2  # the rebuilt index was stored


def test_unusable_cache_folder_still_returns_the_index(tasks_folder, counted_build, monkeypatch, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "lm_eval_task_index").write_text("")  # a file where the cache folder should be
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "ro"))
    for _ in range(2):
        assert cached_index(tasks_folder, "0.4.13", counted_build) == TaskIndex.build([tasks_folder])
    assert len(counted_build.calls) == 2


@pytest.mark.heavy  # indexes lm-eval's ~14,000 task YAMLs twice in a subprocess
def test_task_manager_with_the_cache_equals_lm_evals_own_index(tmp_path):
    """The real lm-eval folder: cached index == lm-eval's own build; plugin tasks and user overrides as before."""
    (tmp_path / "mine.yaml").write_text(
        "task: hellaswag\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: x\ndoc_to_target: y\n"
    )
    code = (
        "import json, sys\n"
        "from lm_eval.tasks import TaskManager\n"
        "from lm_eval.tasks._index import TaskIndex\n"
        "import harness_ext.plugin.autoload as a; a.install()\n"
        "tm = TaskManager()\n"  # fills the cache (or reads it)
        "cached = TaskManager(include_path=sys.argv[1])\n"  # reads it
        "import lm_eval.tasks.manager as m\n"
        "own = TaskIndex.build.__wrapped__([m.Path(m.__file__).parent])  # lm-eval's own builder, uncached\n"
        "same = all(own[k] == cached.task_index[k] for k in own if k != 'hellaswag')\n"
        "print(json.dumps({'same': same, 'missing': sorted(set(own) - set(cached.task_index)),\n"
        "  'n': len(own), 'kv': 'kv_retrieval' in cached.task_index,\n"
        "  'user': str(cached.task_index['hellaswag'].yaml_path)}))\n"
    )
    env = dict(os.environ, NEEDLES_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["n"] > 10_000 and out["same"] and out["missing"] == []
    assert out["kv"] and out["user"] == str(tmp_path / "mine.yaml")
    assert "overrides existing task" in proc.stderr
