"""Every `needles` subcommand, found by walking the CLI parser itself, is fed the bad inputs that apply to it.

Each case must exit 2 with exactly one `needles: error:` line that names the offending argument or value,
a `fix:` line, no traceback, and no output file left behind. A new subcommand fails
`test_every_subcommand_has_a_base_invocation` until it gets a base invocation here: the generated cases
then cover it without anyone writing them.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
from study_configs import kv_study

from harness_ext.cli.app import build_parser, main

# A valid invocation of each leaf command: the sweep changes one argument at a time. Placeholders are
# filled by the `env` fixture. Heavy commands get their cheapest real configuration (the tiny model), so a
# check that is missing costs seconds, not a training run.
BASE: dict[tuple[str, ...], list[str]] = {
    ("tasks-path",): [],
    ("models",): ["smollm2"],
    ("generate-kv",): ["--num-samples", "2", "--num-dicts", "4", "-o", "{OUT}/kv.jsonl"],
    ("demo",): ["--model", "{TINY}", "--output", "{OUT}/demo"],
    ("results",): ["{RUN}"],
    ("leaderboard",): ["{RUN}", "-o", "{OUT}/board.csv"],
    ("gate",): ["--baseline", "{RUN}", "--candidate", "{RUN2}", "--report", "{OUT}/gate.md"],
    ("plot",): ["kv", "{RUN}", "-o", "{OUT}/kv.png"],
    ("data", "fetch"): ["mdqa", "--out", "{OUT}/mirror"],
    ("data", "verify"): ["mdqa", "--mirror", "{LITM}"],
    ("data", "list"): ["needles_general"],
    ("data", "mdqa-fixture"): [
        "--out",
        "{OUT}/mdqa",
        "--oracle",
        "{ORACLE}",
        "--documents",
        "10",
        "--num-questions",
        "3",
    ],
    ("data", "flenqa-fixture"): ["--out", "{OUT}/flenqa", "--ctx-sizes", "250", "--instances", "2"],
    ("data", "musique-fixture"): ["--out", "{OUT}/musique", "--size", "3"],
    ("data", "summhay-fixture"): ["--out", "{OUT}/summhay", "--size", "6"],
    ("finetune",): [
        "--model",
        "{TINY}",
        "-o",
        "{OUT}/ft",
        "--num-samples",
        "4",
        "--num-dicts",
        "4",
        "--max-steps",
        "1",
    ],
    ("export-openai",): ["--num-samples", "12", "--num-dicts", "4", "-o", "{OUT}/openai.jsonl"],
    ("loop",): ["--model", "{TINY}", "-o", "{OUT}/loop", "--num-samples", "4", "--num-dicts", "4", "--max-steps", "1"],
    ("heads",): ["--model", "{TINY}", "-o", "{OUT}/heads", "--lengths", "128", "--depths", "0.5", "--probes", "niah"],
    ("heads", "compare"): ["{HEADS}", "{HEADS}", "-o", "{OUT}/compare.json"],
    ("heads", "patch"): [
        "--source",
        "{TINY}",
        "--target",
        "{TINY}",
        "--source-heads",
        "{TINY_HEADS}",
        "--target-heads",
        "{TINY_HEADS}",
        "--sets",
        "top:1",
        "--eval-lengths",
        "128",
        "--eval-samples",
        "1",
        "-o",
        "{OUT}/patch",
    ],
    ("experiment",): ["{EXPERIMENT}", "-o", "{OUT}/exp"],
    ("study",): ["{STUDY}", "-o", "{OUT}/study", "--dry-run"],
    ("scorecard",): ["{TINY}", "--budget", "tiny", "-o", "{OUT}/card", "--dry-run"],
}

# Flags for which zero is a meaningful value (seeds, ratios that may be off, "0 = disabled").
ZERO_OK = {
    "seed", "data_seed", "kv_seed", "eval_seed", "depths", "kv_depths", "eval_depths", "warmup_ratio", "weight_decay",
    "lora_dropout", "max_drop", "keep_checkpoints", "save_every", "threshold", "extra_tokens", "max_grad_norm",
}  # fmt: skip
OUTPUT_DESTS = {"output", "out", "output_dir", "report", "summary", "pivot", "markdown", "html", "plots_dir"}
INPUT_DESTS = {"config", "inputs", "paths", "a", "b", "baseline", "candidate", "mirror", "oracle", "tokenizer", "scores",
               "needles", "adapter", "source", "target", "source_heads", "target_heads", "source_adapter",
               "target_adapter"}  # fmt: skip
NOT_A_PATH = {("models",), ("data", "list")}


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    own = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if not subs or (own and prefix):
        yield prefix, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _leaves(child, (*prefix, name))


LEAVES = dict(_leaves(build_parser()))


def _flag(action: argparse.Action) -> str | None:
    return max(action.option_strings, key=len) if action.option_strings else None


def _replace(
    argv: list[str], action: argparse.Action, positionals: list[argparse.Action], values: list[str]
) -> list[str]:
    """argv with ``action``'s value(s) replaced (or added). A base lists its positionals first, one token each."""
    out = list(argv)
    flag = _flag(action)
    if flag is None:
        i = positionals.index(action)
        return [*out[:i], *values, *out[i + 1 :]]
    names = set(action.option_strings)
    for i, tok in enumerate(out):
        if tok in names:
            j = i + 1
            while j < len(out) and not (out[j].startswith("-") and not out[j].lstrip("-").replace(".", "").isdigit()):
                j += 1
            return [*out[: i + 1], *values, *out[j:]]
    return [*out, flag, *values]


def _cases() -> list[tuple[str, tuple[str, ...], str, list[str], list[str]]]:
    """(case id, command, kind, argv template, injected values) for every applicable bad input of every leaf command."""
    cases = []
    for cmd, parser in LEAVES.items():
        if cmd not in BASE:
            continue
        actions = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        positionals = [a for a in actions if not a.option_strings]
        base = [*cmd, *BASE[cmd]]

        def _sub(a: argparse.Action, values: list[str], base=base, cmd=cmd, positionals=positionals):
            return [*cmd, *_replace(base[len(cmd) :], a, positionals, values)], values

        for a in actions:
            name = _flag(a) or a.dest
            if a.choices and not isinstance(a.choices, range) and a.type in (None, str):
                cases.append((f"{' '.join(cmd)} {name}=bogus", cmd, "choice", *_sub(a, ["bogus-choice"])))
            if a.type in (int, float):
                cases.append((f"{' '.join(cmd)} {name}=-1", cmd, "number", *_sub(a, ["-1"])))
                if a.dest not in ZERO_OK:
                    cases.append((f"{' '.join(cmd)} {name}=0", cmd, "number", *_sub(a, ["0"])))
            if a.dest in INPUT_DESTS and cmd not in NOT_A_PATH:
                for kind in ("missing", "empty_dir", "truncated_json", "invalid_yaml"):
                    cases.append((f"{' '.join(cmd)} {name}={kind}", cmd, kind, *_sub(a, [f"{{{kind.upper()}}}"])))
            if a.dest in OUTPUT_DESTS:
                cases.append((f"{' '.join(cmd)} {name}=under_a_file", cmd, "output", *_sub(a, ["{AFILE}/x/out"])))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data, tiny_llama_dir, smollm2_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sweep-inputs")
    runs = {}
    for name, values in (("RUN", [1, 0, 1, 1]), ("RUN2", [1, 1, 0, 1])):
        folder = root / name.lower()
        folder.mkdir()
        scores = {"value_acc,none": sum(values) / 4, "value_acc_stderr,none": 0.2}
        scores.update({"value_acc_len512_depth0.50,none": 0.5, "value_acc_len512_depth0.50_stderr,none": 0.2})
        (folder / "results_2026-01-01T00-00-00.000000.json").write_text(
            json.dumps(
                {
                    "results": {"kv_retrieval_simple": {"alias": "kv_retrieval_simple", **scores}},
                    "configs": {"kv_retrieval_simple": {"task": "kv_retrieval_simple", "metadata": {}}},
                    "versions": {"kv_retrieval_simple": 1.0},
                    "n-shot": {"kv_retrieval_simple": 0},
                    "higher_is_better": {"kv_retrieval_simple": {"value_acc": True}},
                    "n-samples": {"kv_retrieval_simple": {"original": 4, "effective": 4}},
                    "config": {"model": "vllm", "model_args": f"pretrained={smollm2_dir}"},
                    "date": 1795240155.5,
                }
            )
        )
        rows = [
            {"doc_id": i, "filter": "none", "doc_hash": f"d{i}", "prompt_hash": f"p{i}", "target_hash": f"t{i}", "value_acc": v}
            for i, v in enumerate(values)
        ]  # fmt: skip
        (folder / "samples_kv_retrieval_simple_2026-01-01T00-00-00.000000.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        runs[name] = str(folder)
    (root / "empty").mkdir()
    (root / "truncated.json").write_text('{"results": {"kv_retrieval_simple": {"value_acc,n')
    (root / "bad.yaml").write_text("model: [unclosed\n  - : :")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "tiny_heads.json").write_text(
        json.dumps({"schema": "needles.heads/1", "scores": [[0.9, 0.0], [0.0, 0.5]], "threshold": 0.1, "model": {}})
    )
    (root / "exp.yaml").write_text(
        json.dumps(
            {
                "name": "sweep",
                "model": str(tiny_llama_dir),
                "finetune": {"data": {"num_samples": 4, "num_dicts": 4, "lengths": None}, "max_steps": 1},
                "metadata": {"num_dicts": 4, "num_samples": 2, "lengths": None},
                "suite": [{"task": "kv_retrieval_simple", "role": "target", "metric": "value_acc"}],
            }
        )
    )
    (root / "study.yaml").write_text(json.dumps(kv_study(str(tiny_llama_dir), name="sweep")))
    with gzip.open(root / "truncated.jsonl.gz", "wt") as f:
        f.write('{"question": "who')
    litm = shared_data / "lost-in-the-middle"
    heads = shared_data / "retrieval-head" / "head_score" / "Mistral-7B-Instruct-v0.2.json"
    if not heads.exists():
        heads = next((shared_data / "retrieval-head" / "head_score").glob("*.json"))
    return {
        **runs,
        "TINY": str(tiny_llama_dir),
        "LITM": str(litm),
        "ORACLE": str(litm / "qa_data" / "nq-open-oracle.jsonl.gz"),
        "HEADS": str(heads),
        "MISSING": str(root / "does-not-exist"),
        "EMPTY_DIR": str(root / "empty"),
        "TRUNCATED_JSON": str(root / "truncated.json"),
        "INVALID_YAML": str(root / "bad.yaml"),
        "AFILE": str(root / "afile"),
        "TINY_HEADS": str(root / "tiny_heads.json"),
        "EXPERIMENT": str(root / "exp.yaml"),
        "STUDY": str(root / "study.yaml"),
    }


def test_every_subcommand_has_a_base_invocation():
    missing = sorted(" ".join(cmd) for cmd in LEAVES if cmd not in BASE)
    assert not missing, f"add a base invocation to BASE in {__file__} for: {missing}"
    assert len(CASES) > 150  # the generated sweep really covers the commands


@pytest.mark.parametrize("case_id,cmd,kind,template,injected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_clear_message(
    case_id, cmd, kind, template, injected, env, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    values = {**env, "OUT": str(out)}
    argv = [tok.format(**values) if "{" in tok else tok for tok in template]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, f"{case_id}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("needles: error:")]
    assert len(errors) == 1, err[-2000:]
    assert any(line.strip().startswith("fix:") for line in err.splitlines()), err[-2000:]
    name = case_id.rpartition(" ")[2].partition("=")[0]
    bad_values = [v.format(**values) for v in injected]
    flag_words = {name.lstrip("-"), name.lstrip("-").replace("-", "_"), name.lstrip("-").replace("-", " ")}
    assert any(w and w in err for w in flag_words) or (kind != "number" and any(v in err for v in bad_values)), (
        f"{case_id}: the message names neither the argument nor the value:\n{err[-1500:]}"
    )
    # nothing written: no output folder, no stray files in the working folder
    assert not out.exists() or not any(out.rglob("*")), sorted(map(str, out.rglob("*")))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == [n for n in before if n != "out"]
    assert Path(env["AFILE"]).read_text() == "a file, not a folder\n"
