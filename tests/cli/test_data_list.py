"""`needles data list families`: every data family and cell, how to use it three ways, and its knobs."""

from __future__ import annotations

import dataclasses

from harness_ext.cli.app import build_parser
from harness_ext.cli.app import main as cli_main
from harness_ext.finetune.config import DataOptions
from harness_ext.finetune.families import TRAIN_NUM_SAMPLES, describe_families
from harness_ext.tasklib.synth_mdqa import CELLS, SynthSpec


def _families_output(capsys) -> tuple[str, str]:
    code = cli_main(["data", "list", "families"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


def test_the_table_names_every_cell_with_its_task_probe_and_axes(capsys):
    out, err = _families_output(capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["family", "cell", "concept", "diversity", "--probes", "lm-eval", "task(s)"]
    for name, cell in CELLS.items():
        row = next(line for line in lines if line.split()[:2] == ["synth_mdqa", name])
        assert row.split()[2:6] == [cell.concept, cell.diversity, f"synth_mdqa:{name}", f"synth_mdqa_{name}"]
        assert f"{name}: {cell.summary}" in lines
    kv = next(line for line in lines if line.startswith("kv "))
    assert "kv_retrieval_simple, kv_retrieval_simple_template, kv_retrieval_multisubkey" in kv
    assert f"{len(CELLS) + 1 + 6} cells in 4 families" in err  # + musique and summhay: real, symbolic, templated


def test_every_knob_has_its_flag_metadata_key_and_defaults(capsys):
    out, _err = _families_output(capsys)
    synth = out[out.index("knobs of synth_mdqa") :].splitlines()
    defaults = {f.name: f.default for f in dataclasses.fields(SynthSpec)}
    flags = {f.name for f in dataclasses.fields(DataOptions)}
    knobs = dict.fromkeys(k for cell in CELLS.values() for k in cell.knobs)
    for meta_key in knobs:
        key = meta_key.removeprefix("synth_")
        row = next(line.split() for line in synth if line.split()[:1] == [key])
        assert key in flags and row[2] == meta_key  # the finetune flag exists; the lm-eval --metadata key
        users = [c for c, cell in CELLS.items() if meta_key in cell.knobs]
        assert row[-1] == ("all" if len(users) == len(CELLS) else users[-1])
    assert next(line for line in synth if line.split()[:1] == ["num_samples"]).split()[3:5] == [
        str(TRAIN_NUM_SAMPLES),
        str(defaults["num_samples"]),
    ]
    assert next(line for line in synth if line.split()[:1] == ["facts_per_document"]).split()[-2:] == [
        "symbolic_kv,",
        "templated_entities",
    ]
    kv = out[out.index("knobs of kv") : out.index("knobs of synth_mdqa")]
    assert "--data-seed" in kv and "1000" in kv  # the KV eval tasks' seed differs from the training seed


def test_the_rows_are_usable_as_they_are_printed():
    from harness_ext.finetune.data import train_spec

    rows = describe_families()
    assert [r["cell"] for r in rows] == [None, *CELLS] + ["real", "symbolic", "templated"] * 2
    for r in rows[1:]:
        assert train_spec(r["data"]).synth.cell == r["cell"]  # the `data:` shown is a valid training config
    # `data list` without the view still lists the default lm-eval group
    assert build_parser().parse_args(["data", "list"]).group == "needles_general"
