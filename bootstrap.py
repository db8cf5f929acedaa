#!/usr/bin/env python3
"""Set up .venv with what is missing, then run moedesk. Standard library only.

    python3 bootstrap.py app     # install what is missing, start moedesk on the bundled model
    python3 bootstrap.py test    # install what is missing, run the whole test suite
    python3 bootstrap.py setup   # only install

torch: `torch==2.13.0` is asked for. On Linux that is PyPI's CUDA build, so a user with an NVIDIA GPU
gets GPU support; where a CPU build of that version is available locally (a wheel directory known to
pip) pip takes it. Override with MOEDESK_TORCH="torch==X" and MOEDESK_TORCH_INDEX_URL=<index> (for
example PyTorch's CPU-only index, to avoid the large CUDA download on a machine without a GPU).

llama.cpp (GGUF models): llama-cpp-python is built from source (a C++ compiler and CMake needed, about
6 minutes; pip caches the wheel). For the app a failed build is a warning — native models still work;
for the tests it is an error. For a CUDA build set CMAKE_ARGS="-DGGML_CUDA=on" before the first run.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".moedesk-installed"
TORCH = os.environ.get("MOEDESK_TORCH", "torch==2.13.0")
# The tests run the Triton kernels in Triton's CPU interpreter. A CUDA build of torch brings its own
# matching triton; only where it is missing (CPU builds, on Linux where triton has wheels) is it added.
TRITON = os.environ.get("MOEDESK_TRITON", "triton==3.9.0")
EXTRAS = {"app": "", "test": "[test]", "setup": "[test]"}
QT_TEST_ENV = {"QT_QPA_PLATFORM": "offscreen"}  # the GUI tests run without a screen


def run(cmd: list[str], **kw) -> int:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def install_key(extras: str) -> str:
    """Changes whenever what would be installed changes."""
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode() + TORCH.encode()
                          + TRITON.encode()).hexdigest()


def need_install(extras: str) -> bool:
    return install_key(extras) not in (STAMP.read_text().split() if STAMP.exists() else [])


def install(extras: str) -> None:
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not need_install(extras):
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check"]
    if subprocess.call([str(PY), "-c", "import torch"], stderr=subprocess.DEVNULL) != 0:
        index = os.environ.get("MOEDESK_TORCH_INDEX_URL")
        if run(pip + [TORCH] + (["--index-url", index] if index else [])) != 0:
            sys.exit("could not install torch; set MOEDESK_TORCH / MOEDESK_TORCH_INDEX_URL and retry")
    if run(pip + ["-e", f".{extras}"]) != 0:
        sys.exit("could not install moedesk's dependencies")
    if subprocess.call([str(PY), "-c", "import llama_cpp"], stderr=subprocess.DEVNULL) != 0:
        print("building llama-cpp-python for GGUF models (once; a few minutes)", flush=True)
        if run(pip + ["-e", ".[llamacpp]"]) != 0:
            if extras == "[test]":
                sys.exit("could not install llama-cpp-python (needs a C++ compiler and CMake); the tests need it")
            print("could not install llama-cpp-python: GGUF models will not open, native models will", flush=True)
    if extras == "[test]" and sys.platform.startswith("linux") and \
            subprocess.call([str(PY), "-c", "import triton"], stderr=subprocess.DEVNULL) != 0:
        if run(pip + [TRITON]) != 0:
            print("could not install triton: the kernel tests will be skipped", flush=True)
    old = STAMP.read_text() if STAMP.exists() else ""
    STAMP.write_text(old + install_key(extras) + "\n")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "app"
    if command not in EXTRAS:
        print(__doc__)
        return 2
    install(EXTRAS[command])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if command == "test":
        return run([PY, "-m", "pytest", "-q", *argv[1:]], env=dict(env, **QT_TEST_ENV))
    if command == "app":
        return run([PY, "-m", "desktop", *argv[1:]], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
