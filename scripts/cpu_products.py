"""CPU decode-shaped products, one run, medians: fp32 and bf16 F.linear against torch's weight-only
kernels (what engine/quant.py uses) and, when it is installed, torchao's int8/int4 weight-only configs.
This is the measurement behind the choices in docs/quantization.md; torchao is not a dependency
(`pip install torchao` to include it). Usage: python scripts/cpu_products.py [--n 4096 --k 4096]"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import cuda_graphs  # noqa: E402
from engine.quant import cpu_pack, cpu_product  # noqa: E402
from kernels.formats import quantize_int4, quantize_int8  # noqa: E402


def median_ms(fn, n: int = 50) -> float:
    return cuda_graphs.median_ms(fn, n, cuda=False, warmup=5)


def torchao_rows(w: torch.Tensor, x: torch.Tensor) -> dict:
    try:
        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore")
        import torchao.quantization as tq
        from torchao.quantization import quantize_
    except Exception as e:
        return {"torchao": f"not installed ({type(e).__name__})"}
    out = {"torchao_version": __import__("torchao").__version__}
    for name, cfg in [("torchao int8 weight-only", lambda: tq.Int8WeightOnlyConfig()),
                      ("torchao int4 weight-only g64", lambda: tq.Int4WeightOnlyConfig(group_size=64))]:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
        layer.weight.data.copy_(w)
        try:
            quantize_(layer, cfg())
            out[name] = median_ms(lambda: layer(x.to(torch.bfloat16)))
            compiled = torch.compile(layer)
            out[name + " (torch.compile)"] = median_ms(lambda: compiled(x.to(torch.bfloat16)))
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    w, x = torch.randn(args.n, args.k) * 0.02, torch.randn(args.rows, args.k)
    wb = w.to(torch.bfloat16)
    res = {"shape": [args.n, args.k], "rows": args.rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "fp32 F.linear": median_ms(lambda: F.linear(x, w)),
           "bf16 F.linear": median_ms(lambda: F.linear(x.to(torch.bfloat16), wb))}
    for name, qw in [("int8 _weight_int8pack_mm", quantize_int8(w)), ("int4 g64 _weight_int4pack_mm_for_cpu", quantize_int4(w, 64))]:
        packed = cpu_pack(qw)
        res[name] = median_ms(lambda: cpu_product(packed, x))
        res[name + " fp32 activations"] = median_ms(lambda: _fp32_activations(packed, x))
    res.update(torchao_rows(w, x))
    print(json.dumps(res, indent=1))


def _fp32_activations(packed, x):
    """The same kernels fed fp32 activations (their slow path), to show why bf16 is used."""
    kind, *p = packed
    if kind == "int8":
        return torch.ops.aten._weight_int8pack_mm(x, p[0], p[1].float())
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], p[1], p[2].float())


if __name__ == "__main__":
    main()
