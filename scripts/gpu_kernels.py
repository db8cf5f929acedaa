"""GPU checks of kernels/: correctness against the references at model-sized shapes, CUDA-graph capture
(no host synchronisation) and speed. Installs nothing; about a minute on an H200, mostly Triton compiles.

    from scripts.gpu_kernels import run_kernel_checks
    run_kernel_checks(results)  # fills results["kernels_*"]; each check records its error and goes on

Speed is measured on the GPU alone: the calls are captured in a CUDA graph (as the engine's decode runs
them), replayed, and timed with CUDA events; the median of several replays counts. Decode products
cycle through enough copies of the weight that it cannot stay in the 50 MB L2, so the bandwidth is
HBM's: bytes of weight + scales (+ zeros) read per call / time.
"""
from __future__ import annotations

import statistics
import time
import traceback

import torch
import torch.nn.functional as F

L2_DEFEAT_BYTES = 256 << 20  # weight copies per timed graph: at least this much, well beyond L2
# bf16 outputs round to 2⁻⁸ of their magnitude; fused_moe also rounds its bf16 intermediate
QUANT_MATMUL_TOL, FUSED_MOE_TOL = 1e-2, 3e-2


def run_kernel_checks(out: dict, peak_gbps: float = 4800.0) -> dict:
    """Run every check, recording each result (or its error) under out["kernels_<name>"]."""
    checks = [("quant_matmul_correct", check_quant_matmul), ("quant_matmul_graph", check_quant_matmul_graph),
              ("quant_matmul_speed", lambda: speed_quant_matmul(peak_gbps)),
              ("fused_moe_correct", check_fused_moe), ("fused_moe_graph", check_fused_moe_graph),
              ("fused_moe_speed", speed_fused_moe)]
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            out["kernels_" + name] = fn()
        except Exception as e:  # record and go on: every check reports
            out["kernels_" + name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        out["kernels_" + name + "_s"] = round(time.perf_counter() - t0, 2)
        torch.cuda.empty_cache()
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)).item()


def quantizers():
    from kernels.formats import quantize_fp8, quantize_int4, quantize_int8
    return {"int8": quantize_int8, "int4-g128": lambda w: quantize_int4(w, 128),
            "int4-g64": lambda w: quantize_int4(w, 64), "fp8": quantize_fp8}


def weight(N: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(N, K, device="cuda", generator=g) * 0.02


# ---- quant_matmul ------------------------------------------------------------------------------------

def check_quant_matmul() -> dict:
    """Every format at N = K = 2048 and 4096 (and a K that leaves int4's last group short), M = 1, 4, 8."""
    from kernels.quant_matmul import quant_matmul
    from kernels.reference import quant_matmul_ref
    res = {}
    for N, K in ((2048, 2048), (4096, 4096), (2048, 2112)):
        for fmt, quantize in quantizers().items():
            w = quantize(weight(N, K))
            for M in (1, 4, 8):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                res[f"{fmt}_{N}x{K}_M{M}"] = round(rel_err(quant_matmul(x, w), quant_matmul_ref(x, w)), 5)
    res["max_rel_err"] = max(res.values())
    res["ok"] = res["max_rel_err"] < QUANT_MATMUL_TOL
    return res


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after warm-up runs (and Triton compiles) on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def check_quant_matmul_graph() -> dict:
    """Captured once, replayed on new inputs: the same answers as eager calls."""
    from kernels.quant_matmul import quant_matmul
    res = {}
    for fmt, quantize in quantizers().items():
        res[fmt] = replay_error(quant_matmul, quantize(weight(4096, 2048)))
    res["ok"] = max(res.values()) < QUANT_MATMUL_TOL
    return res


def replay_error(quant_matmul, w) -> float:
    x = torch.zeros(1, 2048, device="cuda", dtype=torch.bfloat16)  # the graph's input, refilled per replay
    box = {}
    graph = capture(lambda: box.__setitem__("y", quant_matmul(x, w)))
    errs = []
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        errs.append(rel_err(box["y"], quant_matmul(x, w)))
    return max(errs)


def graph_time_us(fn, calls_per_replay: int, replays: int = 15) -> float:
    """Median GPU time per call of fn (which makes calls_per_replay calls), from CUDA-graph replays."""
    graph = capture(fn)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls_per_replay)
    del graph
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, min(64, -(-L2_DEFEAT_BYTES // nbytes)))


def clone_weight(w):
    from kernels.formats import QWeight
    if isinstance(w, torch.Tensor):
        return w.clone()
    return QWeight(w.fmt, w.qweight.clone(), w.scale.clone(), None if w.zero is None else w.zero.clone(),
                   w.group, w.block)


def bandwidth(nbytes: int, us: float, peak_gbps: float) -> dict:
    gbps = nbytes / (us * 1e-6) / 1e9
    return {"us": round(us, 2), "GB/s": round(gbps, 1), "of_peak": round(gbps / peak_gbps, 3)}


def speed_quant_matmul(peak_gbps: float) -> dict:
    """Decode products (M = 1, 4, 8): achieved weight bandwidth per format, and bf16 F.linear's."""
    from kernels.quant_matmul import quant_matmul
    res = {"peak_GB/s": peak_gbps}
    for N, K in ((2048, 2048), (4096, 4096), (14336, 4096)):
        dense = weight(N, K)
        for fmt, quantize in [("bf16_linear", None), *quantizers().items()]:
            try:
                w0 = dense.bfloat16() if quantize is None else quantize(dense)
                nbytes = w0.numel() * 2 if quantize is None else w0.nbytes()
                copies = [w0] + [clone_weight(w0) for _ in range(copies_for(nbytes) - 1)]
                op = F.linear if quantize is None else quant_matmul
                for M in (1, 4, 8):
                    us = time_product(op, torch.randn(M, K, device="cuda", dtype=torch.bfloat16), copies)
                    res[f"{fmt}_{N}x{K}_M{M}"] = bandwidth(nbytes, us, peak_gbps)
            except Exception as e:  # one format failing must not hide the others
                res[f"{fmt}_{N}x{K}"] = {"error": f"{type(e).__name__}: {e}"}
            copies = w0 = None
            torch.cuda.empty_cache()
    return res


def time_product(op, x, copies) -> float:
    """GPU µs per op(x, w), each call on the next copy of the weight."""
    return graph_time_us(lambda: [op(x, w) for w in copies], len(copies))


# ---- fused_moe ---------------------------------------------------------------------------------------

E, TOP_K, H, I = 64, 6, 2048, 1408  # DeepSeek-V2-Lite's routed experts


def moe_weights(kind: str):
    from kernels.formats import quantize_int4
    gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    if kind == "int4-g128":
        gate_up, down = quantize_int4(gate_up, 128), quantize_int4(down, 128)
    return gate_up, down


def routing(T: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    logits[:, :4] += 2.0  # a few popular experts: ragged loads, and some experts get nothing at small T
    weights, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    return weights, ids


def check_fused_moe() -> dict:
    from kernels.fused_moe import fused_moe
    from kernels.reference import fused_moe_ref
    res = {}
    for kind in ("bf16", "int4-g128"):
        gate_up, down = moe_weights(kind)
        for T in (1, 5, 512):
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            w, ids = routing(T, seed=T)
            res[f"{kind}_T{T}"] = round(rel_err(fused_moe(x, w, ids, gate_up, down),
                                                fused_moe_ref(x, w, ids, gate_up, down)), 5)
    res["max_rel_err"] = max(res.values())
    res["ok"] = res["max_rel_err"] < FUSED_MOE_TOL
    return res


def check_fused_moe_graph() -> dict:
    """Routing that changes between replays of one captured graph (what decode verification does)."""
    from kernels.fused_moe import fused_moe
    from kernels.reference import fused_moe_ref
    gate_up, down = moe_weights("int4-g128")
    x = torch.zeros(5, H, device="cuda", dtype=torch.bfloat16)
    w, ids = routing(5)
    box = {}
    graph = capture(lambda: box.__setitem__("y", fused_moe(x, w, ids, gate_up, down)))
    errs = []
    for seed in range(3):
        x.copy_(torch.randn_like(x))
        new_w, new_ids = routing(5, seed=seed + 1)
        w.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        errs.append(rel_err(box["y"], fused_moe_ref(x, w, ids, gate_up, down)))
    return {"int4-g128_T5_rel_err": max(errs), "ok": max(errs) < FUSED_MOE_TOL}


def eager_time_us(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def speed_fused_moe() -> dict:
    """fused_moe (graph-replayed and eager) against the reference loop and the engine's grouped_mm path."""
    from kernels.fused_moe import fused_moe
    from kernels.reference import fused_moe_ref
    res = {}
    for kind in ("bf16", "int4-g128"):
        gate_up, down = moe_weights(kind)
        for T in (5, 512):
            args = (torch.randn(T, H, device="cuda", dtype=torch.bfloat16), *routing(T), gate_up, down)
            res[f"{kind}_T{T}"] = moe_times(fused_moe, fused_moe_ref, args, engine=kind == "bf16")
        gate_up = down = args = None
        torch.cuda.empty_cache()
    return res


def moe_times(fused_moe, fused_moe_ref, args, engine: bool) -> dict:
    row = {"fused_graph_us": timed(lambda: graph_time_us(lambda: fused_moe(*args), 1)),
           "fused_eager_us": timed(lambda: eager_time_us(lambda: fused_moe(*args), reps=10)),
           "reference_us": timed(lambda: eager_time_us(lambda: fused_moe_ref(*args), reps=3))}
    if engine:
        row["engine_grouped_us"] = timed(lambda: engine_grouped_time(*args))
    return row


def timed(measure):
    """measure() rounded, or its error: one failing measurement must not hide the others."""
    try:
        return round(measure(), 1)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def engine_grouped_time(x, w, ids, gate_up, down) -> float:
    """The engine's bf16 sort-by-expert path (torch grouped_mm where available), for comparison."""
    from engine.model.moe import Experts
    experts = Experts(E, H, I).cuda().to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up.copy_(gate_up)
        experts.down.copy_(down)
        return eager_time_us(lambda: experts.forward_grouped(x, w, ids), reps=10)
