"""The plugin registers itself with lm-eval on import, cheaply, idempotently, in any install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _py(code: str, *args: str, python: str = sys.executable, flags: tuple[str, ...] = ()) -> str:
    proc = subprocess.run([python, *flags, "-c", code, *args], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_interpreter_start_imports_nothing_of_ours():
    out = _py(
        "import sys, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('harness_ext', 'kv_tasks', 'lm_eval'))))"
    )
    assert json.loads(out) == []
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    assert "harness_ext" not in trace and "kv_tasks" not in trace


@pytest.mark.heavy  # runs lm-eval or a model in a subprocess
def test_fresh_interpreter_task_manager_finds_plugin_tasks(tmp_path):
    # a user include_path with a task of the same name wins over the plugin (lm-eval precedence)
    (tmp_path / "mine.yaml").write_text(
        "task: kv_retrieval_simple\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: x\ndoc_to_target: y\n"
    )
    code = (
        "import json, sys\n"
        "from lm_eval.tasks import TaskManager\n"
        "import harness_ext.plugin.autoload as a; a.install(); a.install()  # idempotent\n"
        "tm = TaskManager()\n"
        "tm2 = TaskManager(include_path=sys.argv[1])\n"
        "names = [t for t in tm.all_tasks if t.startswith('kv_retrieval')]\n"
        "print(json.dumps({'names': names, 'include': tm2.include_path,\n"
        "  'ours': str(tm.task_index['kv_retrieval_simple'].yaml_path),\n"
        "  'user': str(tm2.task_index['kv_retrieval_simple'].yaml_path),\n"
        "  'finders': sum(type(f).__name__ == '_NeedlesLazyFinder' for f in sys.meta_path)}))\n"
    )
    out = json.loads(_py(code, str(tmp_path)).splitlines()[-1])
    assert set(out["names"]) == {
        "kv_retrieval",
        "kv_retrieval_simple",
        "kv_retrieval_simple_template",
        "kv_retrieval_multisubkey",
    }
    assert out["ours"].endswith("kv_tasks/kv_retrieval/kv_retrieval_simple.yaml")
    assert out["user"] == str(tmp_path / "mine.yaml")
    assert out["include"] == str(tmp_path)  # the user's value is reported unchanged
    assert out["finders"] == 1


@pytest.mark.heavy  # runs lm-eval or a model in a subprocess
def test_lm_eval_ls_lists_plugin_tasks():
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "ls", "tasks"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("kv_retrieval", "kv_retrieval_simple", "kv_retrieval_simple_template", "kv_retrieval_multisubkey"):
        assert f"|{name} " in proc.stdout


def test_tasks_path_command():
    out = subprocess.run([sys.executable, "-m", "harness_ext.cli", "tasks-path"], capture_output=True, text=True)
    path = Path(out.stdout.strip())
    assert (path / "kv_retrieval" / "kv_retrieval.yaml").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("lm_eval_needles-*.whl")
    return whl


def test_wheel_ships_templates_hooks_and_tasks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "lm_eval_needles.pth",
        "lm_eval_needles.start",
        "harness_ext/templates/kv/simple.jinja",
        "harness_ext/templates/kv/simple_answer_template.jinja",
        "harness_ext/templates/kv/multisubkey.jinja",
        "kv_tasks/kv_retrieval/kv_retrieval.yaml",
        "kv_tasks/kv_retrieval/utils.py",
        "harness_ext/plugin/autoload.py",
        "harness_ext/finetune/configs/smollm2_kv_lora.yaml",  # the demo's recipe
        "harness_ext/experiment/configs/smollm2_cpu.yaml",  # the demo's experiment
    ):
        assert required in names, required
    start = zipfile.ZipFile(wheel).read("lm_eval_needles.start").decode().strip()
    assert start == "harness_ext.plugin.autoload:install"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "[lm_eval.tasks]" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.heavy  # runs lm-eval or a model in a subprocess
def test_regular_wheel_install_registers_and_renders(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    deps = sysconfig.get_paths()["purelib"]
    # -S: no site processing, so the editable install's .pth files are NOT read; the wheel's
    # folder is added as a site dir (which runs its lm_eval_needles.pth), dependencies plainly.
    code = (
        "import sys, site, json\n"
        f"site.addsitedir({str(target)!r}); sys.path.append({deps!r})\n"
        "from lm_eval.tasks import TaskManager\n"
        "import harness_ext, harness_ext.tasklib.kv_generator as g\n"
        "tm = TaskManager()\n"
        "d = g.KVGenerator(g.KVSpec(num_samples=1, lengths=None, num_dicts=3)).generate()[0]\n"
        "print(json.dumps({'pkg': harness_ext.__file__, 'task': str(tm.task_index['kv_retrieval'].yaml_path),\n"
        "                  'prompt': d['prompt'][:21]}))\n"
    )
    out = json.loads(_py(code, flags=("-S",)).splitlines()[-1])
    assert out["pkg"].startswith(str(target))
    assert out["task"].startswith(str(target))
    assert out["prompt"] == "Do a task using the l"


def test_needles_error_prints_without_traceback():
    env = dict(os.environ, NEEDLES_DEBUG="0")
    proc = subprocess.run(
        [sys.executable, "-m", "harness_ext.cli", "generate-kv", "--lengths", "1024", "-o", "-"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "needles: error:" in proc.stderr and "tokenizer" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
