"""Cross-model activation patching per head (`needles heads patch`), on the tiny random Llama and a "source" copy
of it whose attention weights alone are perturbed (as the paper finetunes attention only): exact identities of
the patch (all heads = the source, no head = the target, one head = exactly its output difference), the refusals,
and the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness_ext.cli.app import main
from harness_ext.core.errors import NeedlesError
from harness_ext.heads import patch_sets, scorefile
from harness_ext.heads.model import load_model
from harness_ext.heads.patch_compat import check_compatible
from harness_ext.heads.patching import greedy, patched, patched_logits, recording

PROMPT = "The key 7f3a maps to the value 19c2. Question: which value does the key 7f3a map to? Answer:"
ALL = [(la, h) for la in range(2) for h in range(2)]


def _perturbed_copy(src: Path, out: Path, projs: tuple[str, ...], seed: int) -> Path:
    """A copy of the model (tokenizer included) with a seeded random delta on the named attention projections only."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2] in projs:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def source_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return _perturbed_copy(
        tiny_llama_dir, tmp_path_factory.mktemp("src") / "m", ("q_proj", "k_proj", "v_proj", "o_proj"), 1
    )


@pytest.fixture(scope="module")
def source_qkv_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return _perturbed_copy(tiny_llama_dir, tmp_path_factory.mktemp("srcqkv") / "m", ("q_proj", "k_proj", "v_proj"), 2)


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def source(source_dir):
    return load_model(source_dir)


@pytest.fixture(scope="module")
def ids(target) -> torch.Tensor:
    return torch.tensor([target.tokenizer(PROMPT)["input_ids"]])


def _logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits


# ------------------------------------------------------------------------------ identities of the patch
def test_patching_every_head_result_reproduces_the_source(target, source, ids):
    src, tgt = _logits(source, ids), _logits(target, ids)
    assert (src - tgt).abs().max() > 1e-2  # the two models really differ
    got = patched_logits(target, source, ids, ALL, "result")
    torch.testing.assert_close(got, src, atol=1e-4, rtol=1e-4)


def test_patching_no_head_is_the_target_exactly(target, source, ids):
    tgt = _logits(target, ids)
    assert torch.equal(patched_logits(target, source, ids, [], "result"), tgt)
    with torch.inference_mode():
        with recording(source) as acts:
            source.model(input_ids=ids)
        for site in ("result", "z"):
            with patched(target, source, acts, [], site):
                assert torch.equal(target.model(input_ids=ids).logits, tgt)
    assert torch.equal(_logits(target, ids), tgt)  # the hooks are gone after the block


def _residuals_and_z(lm, ids, heads=(), source=None, site="result"):
    """Residual stream right after each layer's attention, and each layer's o_proj input (unpatched run if no heads)."""
    layers = lm.model.model.layers
    resid, zs, handles = {}, {}, []
    for i, layer in enumerate(layers):
        handles.append(
            layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: resid.__setitem__(i, a[0]))
        )
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: zs.__setitem__(i, a[0])))
    try:
        with torch.inference_mode():
            if heads:
                with recording(source) as acts:
                    source.model(input_ids=ids)
                with patched(lm, source, acts, heads, site):
                    lm.model(input_ids=ids)
            else:
                lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return resid, zs


def one_head_patch(target, source, ids, site, layer, head):
    """Patch one head: (residuals of the unpatched target, of the patched one, the expected change at its layer,
    i.e. the head's source-minus-target output computed by hand from o_proj)."""
    d = target.model.config.head_dim
    sl = slice(head * d, (head + 1) * d)
    base_resid, z_t = _residuals_and_z(target, ids)
    _, z_s = _residuals_and_z(source, ids)
    resid, _ = _residuals_and_z(target, ids, [(layer, head)], source, site)
    w_t = target.model.model.layers[layer].self_attn.o_proj.weight
    w_s = source.model.model.layers[layer].self_attn.o_proj.weight
    with torch.no_grad():
        if site == "result":
            expected = z_s[layer][..., sl] @ w_s[:, sl].T - z_t[layer][..., sl] @ w_t[:, sl].T
        else:
            expected = (z_s[layer][..., sl] - z_t[layer][..., sl]) @ w_t[:, sl].T
    assert expected.abs().max() > 1e-3
    for earlier in range(layer):  # nothing changes before the patched layer
        assert torch.equal(resid[earlier], base_resid[earlier])
    return base_resid, resid, expected


@pytest.mark.parametrize("site", ["result", "z"])
@pytest.mark.parametrize("layer, head", [(0, 1), (1, 0)])
def test_one_head_moves_the_residual_by_exactly_its_output_difference(target, source, ids, site, layer, head):
    assert target.model.config.head_dim == 32
    base_resid, resid, expected = one_head_patch(target, source, ids, site, layer, head)
    torch.testing.assert_close(resid[layer] - base_resid[layer], expected, atol=1e-5, rtol=1e-4)


def test_z_of_every_head_reproduces_a_source_that_differs_in_qkv_only(target, source, source_qkv_dir, ids):
    qkv = load_model(source_qkv_dir)
    torch.testing.assert_close(patched_logits(target, qkv, ids, ALL, "z"), _logits(qkv, ids), atol=1e-4, rtol=1e-4)
    # With o_proj perturbed too, z keeps the target's o_proj, so it does not become the source.
    assert (patched_logits(target, source, ids, ALL, "z") - _logits(source, ids)).abs().max() > 1e-3


def test_regenerate_with_every_head_patched_decodes_as_the_source(target, source, ids):
    prompt = ids[0].tolist()
    own, src = greedy(target, prompt, 8), greedy(source, prompt, 8)
    assert own != src
    assert greedy(target, prompt, 8, source, ALL, "result") == src
    assert greedy(target, prompt, 8, source, [], "result") == own


# ------------------------------------------------------------------------------ refusals
def _tiny_variant(tiny_llama_dir: Path, out: Path, layers: int) -> Path:
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.num_hidden_layers = layers
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out


def test_refuses_models_of_another_architecture_or_tokenizer(tiny_llama_dir, source_dir, tmp_path):
    from transformers import AutoTokenizer

    assert check_compatible(source_dir, tiny_llama_dir)["num_layers"] == 2
    three = _tiny_variant(tiny_llama_dir, tmp_path / "three", 3)
    with pytest.raises(NeedlesError, match="num_layers 3 vs 2"):
        check_compatible(three, tiny_llama_dir)
    other_tok = tmp_path / "tok"
    shutil.copytree(source_dir, other_tok)
    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.add_tokens(["<zz_not_in_the_target>"])
    tok.save_pretrained(other_tok)
    with pytest.raises(NeedlesError, match="do not share a tokenizer"):
        check_compatible(other_tok, tiny_llama_dir)


def _heads_file(path: Path, scores: list[list[float]]) -> Path:
    scorefile.write_json(path, {"schema": scorefile.SCHEMA, "scores": scores, "threshold": 0.1, "model": {}})
    return path


SOURCE_SCORES = [[0.9, 0.0], [0.0, 0.5]]  # source heads {0-0, 1-1}
TARGET_SCORES = [[0.8, 0.4], [0.0, 0.0]]  # target heads {0-0, 0-1}: intersection 0-0, complement 1-1, outside 1-0


def test_head_sets_and_bad_specs(tmp_path):
    s = scorefile.load_head_scores(_heads_file(tmp_path / "s.json", SOURCE_SCORES))
    t = scorefile.load_head_scores(_heads_file(tmp_path / "t.json", TARGET_SCORES))
    specs = patch_sets.parse_sets(["intersection", "complement", "random:1", "top:2", "1-0,0-1"])
    got = {hs.name: hs.draws for hs in patch_sets.resolve_sets(specs, s, t, draws=3, seed=0)}
    assert got["intersection"] == (((0, 0),),) and got["complement"] == (((1, 1),),)
    assert got["random:1"] == (((1, 0),),) * 3 and got["top:2"] == (((0, 0), (1, 1)),)
    assert got["1-0,0-1"] == (((0, 1), (1, 0)),)
    for text, says in [("1-x", "not a head set"), ("random:0", "at least 1"), ("everything", "not a head set")]:
        with pytest.raises(NeedlesError, match=says):
            patch_sets.parse_set(text)
    with pytest.raises(NeedlesError, match="twice"):
        patch_sets.parse_sets(["top:1", "top:1"])
    with pytest.raises(NeedlesError, match="names a head twice"):
        patch_sets.parse_set("0-1,0-1")
    for text, says in [("random:2", "only 1 heads lie outside"), ("top:5", "only 4 heads"), ("2-0", "does not exist")]:
        with pytest.raises(NeedlesError, match=says):
            patch_sets.resolve_sets(patch_sets.parse_sets([text]), s, t)
    with pytest.raises(NeedlesError, match="intersection is empty"):
        patch_sets.resolve_sets(patch_sets.parse_sets(["intersection"]), s, t, threshold=0.95)
    with pytest.raises(NeedlesError, match="head grid"):
        patch_sets.check_grids(s, t, 3, 2)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["heads", "patch", *argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_refuses_before_loading_weights(capsys, tiny_llama_dir, source_dir, tmp_path):
    s, t = _heads_file(tmp_path / "s.json", SOURCE_SCORES), _heads_file(tmp_path / "t.json", TARGET_SCORES)
    three = _tiny_variant(tiny_llama_dir, tmp_path / "three", 3)
    # A weights file that cannot be read proves the refusal came before any weights were loaded.
    (three / "model.safetensors").write_bytes(b"not weights")
    common = ["--source-heads", str(s), "--target-heads", str(t), "-o", str(tmp_path / "out")]
    cases = [
        (["--source", str(three), "--target", str(tiny_llama_dir)], "differ in architecture"),
        (["--source", str(source_dir), "--target", str(tiny_llama_dir), "--sets", "3-0"], "does not exist"),
        (["--source", str(source_dir), "--target", str(tiny_llama_dir), "--sets", "top:x"], "not a head set"),
        (["--source", str(source_dir), "--target", str(tiny_llama_dir), "--sets", "random:3"], "outside both"),
        (["--source", str(source_dir), "--target", str(tiny_llama_dir), "--site", "q"], "invalid choice"),
        (["--source", str(source_dir), "--target", str(tmp_path / "none")], "does not exist"),
    ]
    for argv, says in cases:
        rc, _, err = _cli(capsys, *argv, *common)
        assert rc == 2 and "needles: error:" in err and "  fix: " in err and "Traceback" not in err, err
        assert says in err, err
    assert not (tmp_path / "out" / "patch.json").exists()


@pytest.mark.parametrize("continuation", ["teacher-forced", "regenerate"])
def test_cli_end_to_end(capsys, tiny_llama_dir, source_dir, tmp_path, continuation):
    s, t = _heads_file(tmp_path / "s.json", SOURCE_SCORES), _heads_file(tmp_path / "t.json", TARGET_SCORES)
    every = "0-0,0-1,1-0,1-1"
    argv = ["--source", str(source_dir), "--target", str(tiny_llama_dir), "--source-heads", str(s)]
    argv += ["--target-heads", str(t), "--sets", "intersection", "complement", "random:1", every, "--draws", "2"]
    argv += ["--eval-lengths", "128", "--eval-depths", "0", "--eval-samples", "3", "--eval-max-new-tokens", "4"]
    argv += ["--continuation", continuation, "-o", str(tmp_path / "out"), "-q"]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    res = json.loads((tmp_path / "out" / "patch.json").read_text())
    assert res["num_items"] == 3 and res["metric"] == "value_acc" and res["site"] == "result"
    assert res["continuation"] == continuation and res["architecture"]["num_layers"] == 2
    sets = {x["set"]: x for x in res["sets"]}
    assert set(sets) == {"intersection", "complement", "random:1", every}
    assert sets["intersection"]["runs"][0]["heads"] == [[0, 0]] and sets["random:1"]["draws"] == 2
    for x in res["sets"]:
        lo, hi = x["delta_ci95"]
        assert isinstance(lo, float) and isinstance(hi, float) and lo <= x["delta"] <= hi
        assert x["delta"] == pytest.approx(x["accuracy"] - res["target_baseline"]["accuracy"], abs=1e-6)
    (imr,) = res["intersection_minus_random"]
    assert imr["random"] == "random:1" and imr["ci95"][0] <= imr["delta"] <= imr["ci95"][1]
    # Every head patched: the target replies exactly as the source does (and the two differ unpatched).
    source_replies = res["source_reference"]["replies"]
    assert res["target_baseline"]["replies"] != source_replies
    assert sets[every]["runs"][0]["replies"] == source_replies
    assert np.allclose(sets[every]["runs"][0]["per_item"], res["source_reference"]["per_item"])
    assert "intersection - random:1" in out and "patch.json" in out


def test_an_attention_lora_adapter_as_the_source(tiny_llama_dir, target, ids, tmp_path):
    """base + adapter (peft LoRA on q/k/v/o with random nonzero B, merged) patched into the base: all heads = it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    adapted = load_model(tiny_llama_dir, tmp_path / "adapter")
    want = _logits(adapted, ids)
    assert (want - _logits(target, ids)).abs().max() > 1e-3
    torch.testing.assert_close(patched_logits(target, adapted, ids, ALL, "result"), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("continuation", ["teacher-forced", "regenerate"])
def test_paired_deltas_with_a_scorer_that_rewards_the_source(target, source, continuation):
    """Score 1 for replying as the source does: target 0, source 1, every head 1 (whole gap), no CI excludes it."""
    from harness_ext.heads.knockout import EvalSet
    from harness_ext.heads.patch_sets import HeadSet
    from harness_ext.heads.patching import run_patching

    texts = [f"Item {i}: the key {i}a{i} maps to" for i in range(3)]
    sets = [HeadSet("intersection", "intersection", (((0, 0),),)), HeadSet("every", "list", (tuple(ALL),))]
    sets.append(HeadSet("random:1", "random", (((1, 0),), ((0, 1),))))
    probe = EvalSet("t", "m", texts, [lambda r: 0.0] * 3, 4)
    first = run_patching(source, target, probe, sets, continuation=continuation, progress=False)
    src = first["source_reference"]["replies"]
    assert all(a != b for a, b in zip(src, first["target_baseline"]["replies"]))
    scored = EvalSet("t", "m", texts, [lambda r, s=s: float(r == s) for s in src], 4)
    res = run_patching(source, target, scored, sets, continuation=continuation, seed=1, progress=False)
    assert res["target_baseline"]["accuracy"] == 0.0 and res["source_reference"]["accuracy"] == 1.0
    every = next(x for x in res["sets"] if x["set"] == "every")
    assert every["delta"] == 1.0 and every["gap_closed"] == 1.0 and every["delta_ci95"] == [1.0, 1.0]
    rnd = next(x for x in res["sets"] if x["set"] == "random:1")
    per_draw = np.array([r["per_item"] for r in rnd["runs"]])
    assert rnd["accuracy"] == pytest.approx(per_draw.mean(axis=0).mean(), abs=1e-6)
    inter = next(x for x in res["sets"] if x["set"] == "intersection")
    (imr,) = res["intersection_minus_random"]
    assert imr["delta"] == pytest.approx(inter["accuracy"] - rnd["accuracy"], abs=1e-6)
    assert imr["ci95"][0] <= imr["delta"] <= imr["ci95"][1]
