"""needles_long_ppl through the real lm_eval CLI (hf backend, tiny random Llama with SmolLM2's tokenizer), and the
length guard on its loglikelihood requests."""

from __future__ import annotations

import math

import pytest
from lm_eval_cli import hf_task_args, logged_samples

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.leaderboard import collect_rows
from harness_ext.reporting.length_curves import curves
from harness_ext.reporting.plots import loss_series
from harness_ext.tasklib.long_ppl import long_ppl_dataset

SMALL = {"long_ppl_contexts": [64, 256], "long_ppl_continuation": 32, "long_ppl_num_docs": 2}


@pytest.fixture
def meta(shared_data, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))  # lm_eval inherits the environment
    return {**SMALL, "niah_mirror": str(shared_data / "retrieval-head")}


def test_long_ppl_via_cli(lm_eval_run, tiny_llama_dir, meta, tmp_path):
    args = hf_task_args("needles_long_ppl", tiny_llama_dir, meta, max_length=512, max_gen_toks=None)
    res = lm_eval_run(args, "hf_long_ppl")
    scores = res["results"]["needles_long_ppl"]
    for suffix in ("", "_len64", "_len256"):
        nll, ppl = scores[f"nll{suffix},none"], scores[f"ppl{suffix},none"]
        assert 5.0 < nll < 20.0  # a random model over a 49K vocabulary: about ln(49152) = 10.8 nats
        assert isinstance(scores[f"nll{suffix}_stderr,none"], float), suffix
        assert ppl == pytest.approx(math.exp(nll))  # exp(mean NLL), not the mean of the documents' perplexities
        assert res["higher_is_better"]["needles_long_ppl"][f"nll{suffix}"] is False
    assert res["n-samples"]["needles_long_ppl"]["effective"] == 4  # 2 documents x 2 context lengths

    samples = logged_samples(res["_dir"], "needles_long_ppl")
    assert len(samples) == 4
    for s in samples:
        args = s["arguments"]["gen_args_0"]
        assert args["arg_0"] == s["doc"]["context"] and args["arg_1"] == s["doc"]["continuation"]
        loglikelihood = float(s["resps"][0][0][0])  # the sample log writes it as text
        assert s["nll"] == pytest.approx(-loglikelihood / 32)
        assert s[f"nll_len{s['doc']['context_tokens']}"] == s["nll"]

    # reporting: the loss curve is plotted from the run; a loss is never read as a score for effective length
    rows = collect_rows([res["_dir"]])
    assert loss_series(rows) == {
        (tiny_llama_dir.name, "needles_long_ppl"): {
            p: (scores[f"nll_len{p},none"], scores[f"nll_len{p}_stderr,none"]) for p in (64, 256)
        }
    }
    assert curves(rows) == []
    png = tmp_path / "loss.png"
    assert main(["plot", "loss", res["_dir"], "-o", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_guard_refuses_requests_that_lm_eval_would_cut_or_miscount(tiny_llama_dir, meta):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    rows = long_ppl_dataset("needles_long_ppl", {**meta, "pretrained": str(tiny_llama_dir)})["test"].to_list()
    lm = HFLM(pretrained=str(tiny_llama_dir), dtype="float32", max_length=200, device="cpu")

    def requests(docs):
        return [
            Instance("loglikelihood", d, (d["context"], d["continuation"]), i, ("needles_long_ppl", i, 1))
            for i, d in enumerate(docs)
        ]

    with pytest.raises(NeedlesError, match=r"needles_long_ppl: 2 request\(s\) do not fit; longest 288 tokens > .* 200"):
        lm.loglikelihood(requests(rows))
    short = [r for r in rows if r["context_tokens"] == 64]
    with pytest.raises(NeedlesError, match="lm-eval scores 32 tokens, the row says 31"):
        lm.loglikelihood(requests([{**short[0], "continuation_tokens": 31}]))
    assert len(lm.loglikelihood(requests(short))) == 2  # fitting, correctly counted requests are scored


def test_guard_refuses_loss_past_the_window_vllm_serves(tiny_llama_dir, meta):
    """vLLM's rotary table ends at the served RoPE window: past it every log-likelihood is NaN (SmolLM2 at 11,264
    tokens on its 8K window), so a vLLM model (which records its window at start) is refused there; transformers
    computes every position, so the same requests stay scoreable with --model hf."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from harness_ext.plugin.rope_guard import WINDOW_ATTR

    rows = long_ppl_dataset("needles_long_ppl", {**meta, "pretrained": str(tiny_llama_dir)})["test"].to_list()
    lm = HFLM(pretrained=str(tiny_llama_dir), dtype="float32", max_length=512, device="cpu")
    reqs = [
        Instance("loglikelihood", d, (d["context"], d["continuation"]), i, ("needles_long_ppl", i, 1))
        for i, d in enumerate(rows)
    ]
    assert len(lm.loglikelihood(reqs)) == len(rows)  # hf: past the window is a loss like any other
    setattr(lm, WINDOW_ATTR, 200)  # what patch_vllm_init records for a vLLM model served with a 200-token window
    with pytest.raises(NeedlesError, match=r"past vLLM's RoPE window; longest 288 tokens > 200") as err:
        lm.loglikelihood(reqs)
    assert "--model hf" in err.value.fix
