"""Decode-shaped products with quantized weights: y [M, N] = x [M, K] · dequantize(W [N, K])ᵀ.

M is small (1 token at decode, a few at speculative verification), so the product is bound by reading
W: every weight byte is read once and dequantized in registers, the grid runs over blocks of output
columns (and, when those are too few to fill the GPU, over slices of K whose fp32 partial sums are
added afterwards). Nothing here synchronises with the host or allocates a data-dependent shape, so a
call can be captured in a CUDA graph.

The K-block helper `dot_weight_block` is shared with kernels.fused_moe. It keeps the quantized values
exact in the dot's input type (int8, int4 − zero and e4m3 values are all exact in bf16/fp16) and
applies the scale to the fp32 partial sum of each block, so the only rounding besides x's own is the
fp32 accumulation.

Triton is optional: without it this module still imports and `quant_matmul` raises.
"""
from __future__ import annotations

import functools

import torch

from kernels.formats import QWeight

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only or Windows installs: the engine then uses kernels.reference
    triton = tl = None


def triton_jit(fn):
    """triton.jit, or the function as is when triton is missing (it is then never launched)."""
    return triton.jit(fn) if triton is not None else fn


# The interpreter (TRITON_INTERPRET=1, decided when the kernels are decorated) multiplies bf16 tiles as
# raw uint16 bit patterns, so there the dots take fp32 operands: the same products, exact in fp32.
_INTERPRETING = triton is not None and bool(triton.knobs.runtime.interpret)
DOT_IN_FP32 = tl.constexpr(_INTERPRETING) if tl is not None else _INTERPRETING

# Tiles per format: (BLOCK_N, BLOCK_K). int4 takes BLOCK_K = its group so that a K block has one scale
# and zero per row; fp8's BLOCK_K must divide its scale block's width for the same reason.
DEFAULT_BLOCK_N = {"int8": 64, "int4": 64, "fp8": 64, "none": 64}
DEFAULT_BLOCK_K = 128


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("triton is not installed; use kernels.reference on this machine")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_block_k(fmt: str, group: int, block: tuple[int, int]) -> int:
    """The widest K block that holds one scale per row (int4, fp8) or a good default (int8, plain)."""
    if fmt == "int4":
        return group
    if fmt == "fp8":
        return min(DEFAULT_BLOCK_K, block[1])
    return DEFAULT_BLOCK_K


def check_block_k(fmt: str, block_k: int, group: int, block: tuple[int, int]) -> None:
    if block_k & (block_k - 1) or block_k < (32 if fmt == "int4" else 16):
        raise ValueError(f"BLOCK_K must be a power of two ≥ 16 (32 for int4), got {block_k}")
    if fmt == "int4" and group % block_k:
        raise ValueError(f"int4 BLOCK_K {block_k} must divide the group {group}")
    if fmt == "fp8" and block[1] % block_k:
        raise ValueError(f"fp8 BLOCK_K {block_k} must divide the scale block width {block[1]}")


def weight_operands(w: QWeight | torch.Tensor) -> dict:
    """Pointers, strides and format constants of a weight [N, K] or a stack [E, N, K], for the kernels.

    Strides come per role: expert (e), output row (n) and input column (k); a role a tensor lacks gets
    stride 0 and, for a missing tensor, a stand-in pointer that the kernel never reads.
    """
    if isinstance(w, torch.Tensor):
        q, s, z = w, w, w
        fmt, group, block = "none", 0, (1, 1)
        s_strides, z_strides = (0, 0, 0), (0, 0, 0)
    else:
        q, s, fmt, group, block = w.qweight, w.scale, w.fmt, w.group, w.block
        z = w.zero if w.zero is not None else q
        if fmt == "int8":  # scale [.., N]
            s_strides = (s.stride(0) if s.dim() == 2 else 0, s.stride(-1), 0)
        else:  # int4 scale [.., N, G]; fp8 scale [.., ceil(N/bn), ceil(K/bk)]
            s_strides = (s.stride(0) if s.dim() == 3 else 0, s.stride(-2), s.stride(-1))
        z_strides = ((z.stride(0) if z.dim() == 3 else 0, z.stride(-2), z.stride(-1)) if fmt == "int4"
                     else (0, 0, 0))
    q_strides = (q.stride(0) if q.dim() == 3 else 0, q.stride(-2), q.stride(-1))
    return {"q": q, "s": s, "z": z, "q_strides": q_strides, "s_strides": s_strides, "z_strides": z_strides,
            "fmt": fmt, "group": group, "fp8_bn": block[0], "fp8_bk": block[1]}


@triton_jit
def dot(a, b):
    """a [BM, BK] · b [BK, BN] → fp32 [BM, BN]. fp32 operands multiply in full precision, not tf32."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    elif DOT_IN_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton_jit
def dot_weight_block(acc, x_rows, row_mask, k0, K,
                     w_ptr, stride_wn, stride_wk, s_ptr, stride_sn, stride_sk, z_ptr, stride_zn, stride_zk,
                     offs_n, n_mask,
                     FMT: tl.constexpr, GROUP: tl.constexpr, FP8_BN: tl.constexpr, FP8_BK: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """acc [BM, BN] + x[:, k0:k0+BLOCK_K] · dequantize(W)[offs_n, k0:k0+BLOCK_K]ᵀ.

    x_rows [BM, 1] points at each row's first element (rows may be gathered), row_mask [BM, 1] says
    which rows are real. W's block is read once: bytes → exact values in x's type → dot → × scale.
    Out-of-range columns load x = 0, so whatever the weights load there adds nothing.
    """
    if FMT == "int4":
        # Two columns per byte: multiply the even columns of x by the low nibbles and the odd ones by
        # the high nibbles, which spares interleaving the nibbles back into one tile.
        col = k0 + 2 * tl.arange(0, BLOCK_K // 2)  # even columns [BK/2]; K is even, so col + 1 < K too
        k_mask = col < K
        x_even = tl.load(x_rows + col[None, :], mask=row_mask & k_mask[None, :], other=0.0)  # [BM, BK/2]
        x_odd = tl.load(x_rows + col[None, :] + 1, mask=row_mask & k_mask[None, :], other=0.0)
        packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (col // 2)[:, None] * stride_wk,
                         mask=k_mask[:, None] & n_mask[None, :], other=0)  # uint8 [BK/2, BN]
        group = k0 // GROUP  # BLOCK_K divides GROUP: one group per block
        zero = tl.load(z_ptr + offs_n * stride_zn + group * stride_zk, mask=n_mask, other=0).to(tl.int32)
        # ints go to x's type through fp32 (exact; the interpreter cannot cast ints to bf16 directly)
        lo = ((packed & 0xF).to(tl.int32) - zero[None, :]).to(tl.float32).to(x_even.dtype)
        hi = ((packed >> 4).to(tl.int32) - zero[None, :]).to(tl.float32).to(x_even.dtype)
        part = dot(x_even, lo) + dot(x_odd, hi)
        scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sk, mask=n_mask, other=0.0)
        acc += part * scale[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :], mask=row_mask & k_mask[None, :], other=0.0)  # [BM, BK]
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        if FMT == "int8":
            wt = wt.to(tl.float32)  # through fp32, as for int4
        part = dot(xt, wt.to(xt.dtype))
        if FMT == "int8":
            scale = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
            acc += part * scale[None, :]
        elif FMT == "fp8":
            scale = tl.load(s_ptr + (offs_n // FP8_BN) * stride_sn + (k0 // FP8_BK) * stride_sk,
                            mask=n_mask, other=0.0)
            acc += part * scale[None, :]
        else:
            acc += part
    return acc


@triton_jit
def quant_matmul_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, M, N, K, blocks_per_split,
                        stride_xm, stride_ys, stride_ym,
                        stride_wn, stride_wk, stride_sn, stride_sk, stride_zn, stride_zk,
                        FMT: tl.constexpr, GROUP: tl.constexpr, FP8_BN: tl.constexpr, FP8_BK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: rows [BLOCK_M] × output columns [BLOCK_N] over one K slice (program_id 1)."""
    pid_n, pid_split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = (offs_m < M)[:, None]
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = pid_split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(first, last):
        acc = dot_weight_block(acc, x_rows, row_mask, kb * BLOCK_K, K,
                               w_ptr, stride_wn, stride_wk, s_ptr, stride_sn, stride_sk, z_ptr, stride_zn, stride_zk,
                               offs_n, n_mask, FMT, GROUP, FP8_BN, FP8_BK, BLOCK_K)
    y = y_ptr + pid_split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_mask & n_mask[None, :])


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split_k(x: torch.Tensor, programs: int, k_blocks: int) -> int:
    """Slices of K so that about two programs per SM run; 1 off the GPU (the interpreter)."""
    if not x.is_cuda:
        return 1
    want = 2 * sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(k_blocks, 16, cdiv(want, programs)))


def quant_matmul(x: torch.Tensor, w: QWeight, *, block_n: int | None = None, block_k: int | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """x [..., K] · dequantize(w [N, K])ᵀ → [..., N] in x.dtype, accumulated in fp32.

    block_n / block_k / split_k override the per-format defaults (tests, tuning); split_k slices K
    across programs whose fp32 partial sums are added by torch.
    """
    require_triton()
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    ops = weight_operands(w)
    block_n = block_n or DEFAULT_BLOCK_N[w.fmt]
    block_k = block_k or default_block_k(w.fmt, w.group, w.block)
    check_block_k(w.fmt, block_k, w.group, w.block)
    block_m = 16 if M <= 16 else 64  # tl.dot's smallest M is 16: decode rows ride in one padded tile
    n_blocks, m_blocks, k_blocks = cdiv(N, block_n), cdiv(M, block_m), cdiv(K, block_k)
    split = max(1, min(split_k or choose_split_k(x2, n_blocks * m_blocks, k_blocks), k_blocks))
    per_split = cdiv(k_blocks, split)
    split = cdiv(k_blocks, per_split)  # no empty slices
    if split == 1:
        y = torch.empty(1, M, N, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(split, M, N, dtype=torch.float32, device=x.device)  # fp32 partial sums
    quant_matmul_kernel[(n_blocks, split, m_blocks)](
        x2, y, ops["q"], ops["s"], ops["z"], M, N, K, per_split,
        x2.stride(0), y.stride(0), y.stride(1),
        *ops["q_strides"][1:], *ops["s_strides"][1:], *ops["z_strides"][1:],
        FMT=ops["fmt"], GROUP=ops["group"], FP8_BN=ops["fp8_bn"], FP8_BK=ops["fp8_bk"],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    out = y[0] if split == 1 else y.sum(0).to(x.dtype)
    return out.view(*lead, N)
