"""The synth_mdqa group through the real lm_eval CLI (hf backend, tiny random Llama with SmolLM2's tokenizer):
metric keys, per-length/per-position breakdowns with numeric stderr, the data SHA-256 in the results, plain prompts."""

from __future__ import annotations

from lm_eval_cli import hf_task_args, logged_samples

from harness_ext.data.sources import LOST_IN_THE_MIDDLE
from harness_ext.tasklib.mdqa import ORACLE_FILE, render_prompt
from harness_ext.tasklib.synth_mdqa import CELLS, generate, spec_from_metadata

SMALL = {"synth_lengths": [700], "synth_positions": [1, 2], "synth_num_samples": 2, "synth_seed": 3}
SUFFIXES = ("", "_len700", "_pos1", "_pos2", "_len700_pos1", "_len700_pos2")


def test_synth_mdqa_group_via_cli(lm_eval_run, tiny_llama_dir, shared_data, tmp_path, monkeypatch):
    meta = {**SMALL, "mdqa_mirror": str(shared_data / "lost-in-the-middle")}
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cli-cache"))  # lm_eval inherits the environment
    res = lm_eval_run(hf_task_args("synth_mdqa", tiny_llama_dir, meta, max_gen_toks=4), "hf_synth_mdqa")
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "own-cache"))  # rebuilt here, not read back
    for cell in CELLS:
        task = f"synth_mdqa_{cell}"
        scores = res["results"][task]
        for suffix in SUFFIXES:
            assert 0.0 <= scores[f"best_subspan_em{suffix},none"] <= 1.0, (task, suffix)
            assert isinstance(scores[f"best_subspan_em{suffix}_stderr,none"], float), (task, suffix)  # not "N/A"
        assert res["n-samples"][task]["effective"] == 4  # 2 samples x 1 length x 2 positions

        info = res["configs"][task]["metadata"]
        spec = spec_from_metadata(cell, meta)
        rows, expected = generate(spec, {**meta, "pretrained": str(tiny_llama_dir)})
        assert info["needles_data_sha256"] == expected["needles_data_sha256"]
        assert info["needles_data_files"] == {ORACLE_FILE: LOST_IN_THE_MIDDLE.files[ORACLE_FILE].sha256}
        assert info["needles_data_official"] is True and info["needles_synth_cell"] == cell
        assert "NON-OFFICIAL" not in (res["configs"][task].get("task_alias") or "")

        samples = logged_samples(res["_dir"], task)
        assert [s["doc"]["doc_sha256"] for s in samples] == [r["doc_sha256"] for r in rows]
        for s in samples:
            prompt = s["arguments"]["gen_args_0"]["arg_0"]
            assert prompt == s["doc"]["prompt"] == render_prompt(s["doc"])  # no chat template: the LitM prompt
            assert s["doc"]["n_tokens"] <= 700 and s["target"] == s["doc"]["answers"][0]
            assert s["doc"]["ctxs"][s["doc"]["gold_position"] - 1]["isgold"]
            assert s["arguments"]["gen_args_0"]["arg_1"]["until"] == ["\n"]
