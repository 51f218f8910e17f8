"""What a GPU check ran with, as scripts/gpu_check.sh records it: versions.json, and one line for summary.md.

    python scripts/gpu_versions.py OUT_DIR [--commit SHA] [--pack DIR]

Records torch, its CUDA and cuDNN builds, the driver and the GPU (nvidia-smi, where there is one), Python, the
libraries segkit builds on, and the segkit commit: `--commit`, else git (where the checkout has its .git), else
<pack>/commit.txt (written when the pack was made), else "unknown". Prints the summary line.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["torch", "torchvision", "timm", "segmentation-models-pytorch", "kornia", "torchmetrics", "hydra-core",
            "omegaconf", "numpy"]


def _run(*command: str) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def segkit_commit(given: str | None, pack: Path) -> str:
    if given:
        return given
    commit = _run("git", "rev-parse", "HEAD")
    if commit:
        dirty = _run("git", "status", "--porcelain", "--untracked-files=no")
        return commit + (" (with uncommitted changes)" if dirty else "")
    recorded = pack / "commit.txt"
    if recorded.is_file() and recorded.read_text().strip():
        return recorded.read_text().strip() + f" (from {recorded}: the checkout has no .git)"
    return "unknown (no .git here: pass --commit)"


def collect(commit: str | None = None, pack: Path = ROOT / ".gpu-pack") -> dict:
    import torch

    versions: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    versions["torch_cuda"] = torch.version.cuda  # None: a CPU build
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions["cuda_available"] = torch.cuda.is_available()
    versions["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    smi = _run("nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader")
    versions["driver"] = smi.splitlines()[0].split(",")[0].strip() if smi else None
    versions["nvidia_smi"] = smi
    versions["segkit_commit"] = segkit_commit(commit, pack)
    return versions


def summary_line(versions: dict) -> str:
    gpu = ", ".join(versions["gpu"]) or "no CUDA device"
    return (f"{gpu}; driver {versions['driver'] or 'n/a'}; torch {versions['torch']} (CUDA {versions['torch_cuda']}, "
            f"cuDNN {versions['cudnn']}); Python {versions['python']}; timm {versions['timm']}, "
            f"smp {versions['segmentation-models-pytorch']}, kornia {versions['kornia']}, "
            f"torchmetrics {versions['torchmetrics']}, hydra {versions['hydra-core']}; "
            f"segkit {versions['segkit_commit']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--pack", type=Path, default=ROOT / ".gpu-pack")
    args = parser.parse_args(argv)
    versions = collect(args.commit, args.pack)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(summary_line(versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
