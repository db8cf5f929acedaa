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
SATISFIES = {"": ("", "[test]"), "[test]": ("[test]",)}  # a test install has everything the app needs
QT_TEST_ENV = {"QT_QPA_PLATFORM": "offscreen"}  # the GUI tests run without a screen


def run(cmd: list[str], **kw) -> int:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def install_key(extras: str) -> str:
    """Changes whenever what would be installed changes."""
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode() + TORCH.encode()
                          + TRITON.encode()).hexdigest()


def need_install(extras: str) -> bool:
    done = STAMP.read_text().split() if STAMP.exists() else []
    return not any(install_key(e) in done for e in SATISFIES[extras])


BAD_PYSIDE = ("6.12.0",)  # see desktop/qt_binding.py; pyproject.toml excludes them
QT_PACKAGES = ["PySide6", "PySide6_Essentials", "PySide6_Addons", "PySide6_Pdf", "PySide6_WebEngine", "shiboken6"]


def remove_bad_qt(pip: list) -> None:
    """A known-bad PySide6 is removed with all its parts before installing: a downgrade would leave the
    newer release's extra wheels (PySide6_Pdf, PySide6_WebEngine) mixed into the older Qt."""
    code = "import importlib.metadata as m; print(m.version('PySide6'))"
    version = subprocess.run([str(PY), "-c", code], capture_output=True, text=True).stdout.strip()
    if version in BAD_PYSIDE:
        print(f"removing PySide6 {version} (it aborts the app on Python < 3.12)", flush=True)
        run([PY, "-m", "pip", "uninstall", "-y", *QT_PACKAGES])


def install(extras: str) -> None:
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not need_install(extras):
        return
    key = install_key(extras)  # of what is installed now, even if pyproject.toml changes meanwhile
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check"]
    if subprocess.call([str(PY), "-c", "import torch"], stderr=subprocess.DEVNULL) != 0:
        index = os.environ.get("MOEDESK_TORCH_INDEX_URL")
        if run(pip + [TORCH] + (["--index-url", index] if index else [])) != 0:
            sys.exit("could not install torch; set MOEDESK_TORCH / MOEDESK_TORCH_INDEX_URL and retry")
    remove_bad_qt(pip)
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
    STAMP.write_text(old + key + "\n")


# Qt's xcb platform plugin links these system libraries; minimal Debian/Ubuntu images lack some.
QT_XCB_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1", "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0", "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0", "libxcb-xfixes.so.0": "libxcb-xfixes0", "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-sync.so.1": "libxcb-sync1", "libxcb-shm.so.0": "libxcb-shm0", "libxcb-render.so.0": "libxcb-render0",
    "libxcb-util.so.1": "libxcb-util1", "libxcb.so.1": "libxcb1", "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0", "libX11-xcb.so.1": "libx11-xcb1", "libX11.so.6": "libx11-6",
    "libGL.so.1": "libgl1", "libEGL.so.1": "libegl1", "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1", "libfreetype.so.6": "libfreetype6", "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0", "libgthread-2.0.so.0": "libglib2.0-0",
}


def missing_qt_libraries() -> list[str]:
    """Shared libraries Qt's xcb plugin needs that the system lacks (Linux, windowed start only)."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM", "xcb").split(":")[0] != "xcb":
        return []
    where = subprocess.run([str(PY), "-c", "import PySide6, os; print(os.path.dirname(PySide6.__file__))"],
                           capture_output=True, text=True).stdout.strip()
    plugin = Path(where) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    if not plugin.is_file():
        return []
    try:
        out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # no ldd: let Qt report what it misses
    return sorted({line.split()[0] for line in out.splitlines() if "not found" in line})


def qt_library_advice(missing: list[str]) -> str:
    packages = sorted({QT_XCB_PACKAGES[m] for m in missing if m in QT_XCB_PACKAGES})
    unknown = [m for m in missing if m not in QT_XCB_PACKAGES]
    lines = ["Qt cannot open a window: these system libraries are missing: " + ", ".join(missing)]
    if packages:
        lines.append("On Debian/Ubuntu install them with:\n    sudo apt-get install -y " + " ".join(packages))
    if unknown:
        lines.append("Find the package that provides " + ", ".join(unknown) + " with your distribution's "
                     "package search (e.g. `apt-file search NAME`, `dnf provides '*/NAME'`).")
    lines.append("(Without a screen, QT_QPA_PLATFORM=offscreen runs moedesk headless.)")
    return "\n".join(lines)


def build_kernels() -> None:
    """moedesk's C++ CPU kernels for this machine (kernels/cpu; instant once built, rebuilt when their
    source or torch changes). Without them the engine runs PyTorch's products, slower."""
    if subprocess.call([str(PY), "-m", "kernels.cpu"], cwd=ROOT) != 0:
        print("could not build moedesk's CPU kernels (needs a C++ compiler): decoding on the CPU will be slower",
              flush=True)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "app"
    if command not in EXTRAS:
        print(__doc__)
        return 2
    install(EXTRAS[command])
    build_kernels()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if command == "test":
        return run([PY, "-m", "pytest", "-q", *argv[1:]], env=dict(env, **QT_TEST_ENV))
    if command == "app":
        missing = missing_qt_libraries()
        if missing:
            print(qt_library_advice(missing), file=sys.stderr)
            return 1
        return run([PY, "-m", "desktop", *argv[1:]], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
