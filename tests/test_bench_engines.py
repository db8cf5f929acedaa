"""`engine bench --gguf`: the native engine and llama.cpp timed side by side on the same prompt ids."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
from gguf_fixtures import exported_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def bench(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOEDESK_LLAMA_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "engine", "bench", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_bench_runs_native_and_its_gguf_export_side_by_side(tmp_path):
    model, gguf = exported_tiny(tmp_path)
    draft = exported_tiny(tmp_path, ftype="q8_0")[1]  # the same weights in Q8_0: a draft that mostly agrees
    out = tmp_path / "bench.json"
    r = bench("--model", model, "--gguf", gguf, "--draft", draft, "--max-tokens", "12", "--repeat", "1",
              "--k", "2", "--threads", "1", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["configs"]) == {"native off", "native mtp k=2", "llama.cpp off", "llama.cpp lookup k=2",
                                   "llama.cpp draft k=2", "llama.cpp mtp k=2"}
    # greedy everywhere: every speculative run reproduces its own engine's plain decoding
    assert all(c["identical_to_off"] for c in res["configs"].values())
    assert res["configs"]["llama.cpp draft k=2"]["acceptance_rate"] > 0.5
    assert res["variants"]["native"]["engine"] == "native" and res["variants"]["llama.cpp"]["quantization"] == "F32"
    engines = res["engines"]
    assert set(engines) == {"native", "llama.cpp"} and engines["native"]["off_vs_first"] == 1.0
    assert engines["llama.cpp"]["off_vs_first"] > 0 and engines["llama.cpp"]["best"].startswith("llama.cpp ")
    assert isinstance(engines["llama.cpp"]["greedy_ids_equal_first_off"], bool)
    assert res["environment"]["llama_threads"] == "1"
    assert "llama.cpp  best:" in r.stdout


def test_bench_refuses_modes_a_model_lacks_and_bad_files(tmp_path):
    model, gguf = exported_tiny(tmp_path, mtp=False)
    r = bench("--model", gguf, "--speculative", "off,mtp", "--max-tokens", "4", "--repeat", "1")
    assert r.returncode != 0 and "offers speculative modes off, lookup" in r.stderr
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    r = bench("--model", bad, "--max-tokens", "4", "--repeat", "1")
    assert r.returncode != 0 and "GGUF" in r.stderr and "Traceback" not in r.stderr
