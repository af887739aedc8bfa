"""The GPU check kit runs on the lent GPU machine as it is: torch, transformers, peft and accelerate
and nothing else we need (issue 16 item 8).

`.ci/run` builds `.venv-gpu-kit` (only those four packages, from local disk) and the kit
(`bench/gpu_check.py prepare`); this test runs `bench/gpu_check.sh` with that interpreter and
checks it gets as far as "no CUDA device" with every import satisfied, and that the kit fits the
64 MiB the machine takes. Where the venv or the kit is absent it skips, saying how to make them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT_PYTHON = ROOT / ".venv-gpu-kit" / "bin" / "python"
KIT = ROOT / "bench" / ".gpu-check"
FOUR = {"torch", "transformers", "peft", "accelerate"}

pytestmark = pytest.mark.slow


LIST = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"


def _installed(python: Path) -> set[str]:
    out = subprocess.run(
        [str(python), "-c", LIST],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.strip().lower().replace("_", "-") for line in out.splitlines() if line.strip()}


def test_the_kit_gets_to_no_cuda_device_with_only_the_four_packages() -> None:
    if not KIT_PYTHON.exists():
        pytest.skip(f"SKIPPED LOUDLY: no {KIT_PYTHON} (made by .ci/run: a venv with only {sorted(FOUR)})")
    if not (KIT / "site.tar.xz").exists():
        pytest.skip("SKIPPED LOUDLY: no GPU kit (made by .ci/run: .venv/bin/python bench/gpu_check.py prepare)")
    installed = _installed(KIT_PYTHON)
    assert installed >= FOUR
    assert not installed & {"trl", "datasets", "pyarrow", "pandas", "ray", "vllm", "tenacity", "tomli-w"}, (
        "the kit venv must hold what the GPU machine holds, nothing we carry"
    )
    size = sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())
    assert size <= 64 * 2**20, f"the kit is {size / 2**20:.1f} MiB; the GPU machine carries at most 64 MiB"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(KIT_PYTHON), "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    out = done.stdout + done.stderr
    assert "Error" not in out and "cannot import" not in out, out[-3000:]
    assert "every import satisfied" in out and "no CUDA device" in out, out[-3000:]
    assert done.returncode == 2, out[-3000:]
