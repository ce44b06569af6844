"""After `make setup`: which torch was installed and whether it can use this machine's GPU.

Also imports librosa's feature module once, which compiles its numba kernels into librosa's own cache
(about 14 s on a 2-core CPU): otherwise the first tool or test to import it pays that, and a test run
pays it in each of its workers at once.

Warns (exit 0) when the machine has an NVIDIA driver but torch sees no GPU: the usual cause is a
torch build for a newer CUDA than the driver supports, and the tools would then train on the CPU.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def nvidia_driver() -> str | None:
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        return version.read_text().splitlines()[0]
    return "nvidia-smi on PATH" if shutil.which("nvidia-smi") else None


def main() -> None:
    import librosa.feature  # noqa: F401  (see the module docstring)

    cuda = torch.cuda.is_available()
    built_for = torch.version.cuda or "CPU only"
    gpus = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    )
    print(f"torch {torch.__version__} (built for CUDA {built_for}); GPUs torch can use: {gpus}")
    driver = nvidia_driver()
    if driver and not cuda:
        print(
            f"check_env: warning: this machine has an NVIDIA driver ({driver}) but torch cannot use the GPU, "
            f"so training and sampling would run on the CPU. Reinstall torch for your driver's CUDA, e.g. "
            f"`rm -rf .venv && make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126` (README, "
            f'"Two commands").',
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
