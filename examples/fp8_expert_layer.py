"""An FP8 expert up-projection fed directly by moe_raw.permute_quantized, on torch._scaled_grouped_mm (issue 19).

    python examples/fp8_expert_layer.py                  # CUDA sm90 (H100, H200): torch's FP8 GEMM vs bf16 GEMM
    python examples/fp8_expert_layer.py --tokens 4096 --hidden 7168 --out 4096 --experts 256 --topk 8
    python examples/fp8_expert_layer.py --device cpu     # CPU: the FP8 GEMM emulated in fp32 (no scaled GEMM there)

The up-projection of a dropless MoE layer's experts (the first GEMM of examples/dropless_moe_layer.py) with FP8
operands: T tokens x [T, H] bf16, a routing map [T, E] (K experts a token), expert weights w [E, H, O] bf16
(O = 2 F: gate and up), A = align_size, N = T * K + E * (A - 1) rows (permute_and_pad's worst case: no host sync):

  1. permute + quantize  q, sa, _, row_map = moe_raw.permute_quantized(x, routing_map, num_out_tokens=T * K,
                             recipe="rowwise", align_size=A)
                         -> q [N, H] float8_e4m3fn (expert-major, each expert's rows padded with zero rows to a
                            multiple of A), sa [N] fp32 (one scale a row, 1.0 on padding rows), row map [T + 3, E]
  2. offsets             offs = row_map[T + 2]: int32 [E], each expert's padded end row, on the device
  3. weights (once)      wq, sb = quantize_weights(w): wq [E, H, O] e4m3, column-major (the transposed view of an
                            [E, O, H] tensor), sb [E, O] fp32: the same row-wise recipe on each output column w[e, :, n]
  4. GEMM                y = torch._scaled_grouped_mm(q, wq, sa, sb, offs=offs, out_dtype=torch.bfloat16)   [N, O]
                            y[r, n] = bf16(sb[e, n] * (sa[r] * sum_k q[r, k] * wq[e, k, n])), r in expert e's rows
  5. spare rows          the GEMM does not write rows at and after offs[-1] (N is the worst case): they are set to
                            zero by a mask (no host sync). Padding rows inside a group are zero (zero bytes, scale 1).

The bf16 layer it is compared with: rows, _, row_map, _, _ = moe_raw.permute_and_pad(x, routing_map, None, A, T * K)
(the same rows, padding and row map, in bf16; ``compare`` checks the row maps are equal) and
torch._grouped_mm(rows, w, offs=offs) (fp32 accumulation, bf16 out), masked the same way.

torch._scaled_grouped_mm, row-wise 2d-3d case (the MoE forward), as torch's CUDA source checks it (pytorch/pytorch
aten/src/ATen/native/cuda/GroupedBlas.cpp ``_scaled_grouped_mm_cuda``, native/GroupedMMUtils.h, the CUTLASS kernel in
native/cuda/ScaledGroupMM.cu and its per-group set-up in GroupMMCommon.cuh, read on the main branch; torch's
_meta_registrations.py checks the dtype, layout, scale and offs rules the same way for meta / fake tensors, which the
CPU tests use; ``check_operands`` below restates them):

  * device: the op admits compute capability 9.0 and 10.0; the row-wise kernel is CUTLASS's sm90 grouped GEMM, so
    this example calls it on 9.0 (H100, H200) and emulates it elsewhere (``scaled_grouped_mm_available``).
  * mat_a: float8_e4m3fn (e5m2 is refused), 2-D [M, K], row-major (stride(1) == 1), row stride a multiple of 16
    bytes, data pointer 16-byte aligned; K % 16 == 0.
  * mat_b: float8_e4m3fn, 3-D [G, K, N], column-major in its last two dims (stride(-2) == 1, stride(-1) >= K and a
    multiple of 16 bytes): the transpose of a row-major [G, N, K]; K % 16 == 0 and N % 16 == 0.
  * scale_a: float32, 1-D, contiguous, M entries (one per row of mat_a). scale_b: float32, 2-D [G, N], stride(-1) == 1
    (one per output column of each group). Both scales float32 (a float8_e8m0fnu pair selects MXFP8 instead).
  * offs: int32, 1-D, G entries, the cumulative end row of each group, required with a 2-D operand; G < 1024. In this
    2d-3d case a group may be empty and group sizes need no alignment. The 2d-2d GEMM of the weight gradient
    (contracting over the token rows) asserts on the device that every group is non-empty and a multiple of 16 rows
    (16 bytes of FP8): align_size=16 gives the multiple, and is the default here; an expert with no token still has
    0 rows there.
  * out_dtype: bfloat16 only (the default); bias and scale_result: not supported; use_fast_accum default False.
  * output: [M, N] bf16 (row stride padded to 16 bytes); fp32 accumulation, epilogue scale_b * (scale_a * acc), one
    rounding to bf16; rows at and after offs[-1] are left unwritten.

FP8 error (``error_bound``, checked by ``compare``). Each operand element v is quantized once, round to nearest
even, to a code q with its row's (column's) scale s: |q s - v| <= 2^-4 |v| + 2^-10 s (half a step of 3 mantissa bits,
or of E4M3's subnormal step 2^-9 s) and <= |v| (0 is a candidate). So a product of two quantized elements is off by
at most (2^-3 + 2^-8) |a| |b| + 2^-9 (sa |b| + sb |a|), and for each output element, with P = sum_k |a_k| |b_k| over
the exact bf16 operands:

    |y_fp8 - y_bf16| <= (2^-3 + 2^-7) P + 2^-9 (sa sum_k |b_k| + sb sum_k |a_k|) + 2^-8 (|y_fp8| + |y_bf16|)

(the extra 2^-8 P covers both GEMMs' accumulation: fp32, K 2^-24 P up to K = 2^16, and the FP8 tensor cores'
narrower sums inside a k-block before CUTLASS promotes them to fp32, use_fast_accum=False; 2^-8 |y| the two roundings
to bf16, twice over). That bound holds for any data but is loose where the sum cancels; the figure to look at is the
relative (Frobenius) error |y_fp8 - y_bf16| / |y_bf16|, which for rounding errors independent of the data is about
sqrt(ea^2 + eb^2) (ea, eb: each operand's relative quantization error, measured): ``compare`` requires it below
2 sqrt(ea^2 + eb^2) + 2^-7, and on torch's GEMM also within 2^-7 of the fp32 emulation of the same FP8 operands.
Gaussian tokens and weights: ea and eb are about 0.026 and the error about 0.037 (CPU emulation, T 256, H 256).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import moe_raw
from moe_raw import reference_fp8 as RF

FP8 = torch.float8_e4m3fn  # the row-wise scaled grouped GEMM takes E4M3 only
ALIGN = 16  # rows per expert padded to a multiple of 16: what the weight-gradient GEMM needs (module docstring)
ELEMENT_BOUND = 2.0**-3 + 2.0**-7  # coefficient of P in the element-wise bound (module docstring)
SUBNORMAL = 2.0**-9  # coefficient of sa sum|b| + sb sum|a|: E4M3's subnormal codes (module docstring)
OUTPUT_ROUNDING = 2.0**-8  # the two bf16 roundings, twice
REL_SLACK = 2.0**-7


# ------------------------------------------------------------------------------------------------- operands


def quantize_weights(w: torch.Tensor, fp8_dtype=FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights w [E, H, O] (float) -> (wq [E, H, O] fp8, column-major: the transposed view of a contiguous
    [E, O, H]; sb [E, O] float32): each output column w[e, :, n] quantized by the row-wise recipe of
    moe_raw.reference_fp8 (scale = amax / 448, round to nearest even, saturated), so w[e, k, n] ~= wq[e, k, n] *
    sb[e, n]. The B operand and scale_b of torch._scaled_grouped_mm."""
    if w.dim() != 3:
        raise ValueError(f"quantize_weights: w must be [E, H, O], got {tuple(w.shape)}")
    num_experts, hidden, out = w.shape
    columns = w.transpose(1, 2).reshape(num_experts * out, hidden)  # [E * O, H]: one row per output column
    q, scales = RF.quantize_rowwise(columns, fp8_dtype)
    return q.view(num_experts, out, hidden).transpose(1, 2), scales.view(num_experts, out)


def check_operands(q, wq, sa, sb, offs) -> None:
    """Raise ValueError naming the first rule of torch._scaled_grouped_mm's row-wise 2d-3d contract (module docstring)
    that the operands break. Runs on any device (no GEMM, no host sync)."""

    def need(ok, what):
        if not ok:
            raise ValueError(f"torch._scaled_grouped_mm (row-wise, 2d-3d): {what}")

    need(q.dtype == FP8 and wq.dtype == FP8, f"both operands float8_e4m3fn, got {q.dtype} and {wq.dtype}")
    need(q.dim() == 2 and wq.dim() == 3, f"mat_a 2-D and mat_b 3-D, got {q.dim()}-D and {wq.dim()}-D")
    (m, k), (g, kb, n) = q.shape, wq.shape
    need(k == kb, f"contraction dims must match, got {k} and {kb}")
    need(k % 16 == 0 and n % 16 == 0, f"K and N multiples of 16, got K={k}, N={n}")
    need(q.stride(1) == 1 and q.stride(0) >= max(1, k) and q.stride(0) % 16 == 0,
         f"mat_a row-major with a row stride of a multiple of 16 bytes, got strides {q.stride()}")  # fmt: skip
    need(wq.stride(1) == 1 and wq.stride(2) >= max(1, k) and wq.stride(2) % 16 == 0,
         f"mat_b column-major in its last two dims (a transposed [G, N, K]), got strides {wq.stride()}")  # fmt: skip
    need(q.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0, "operand data 16-byte aligned")
    need(sa.dtype == torch.float32 and sb.dtype == torch.float32, f"float32 scales, got {sa.dtype} and {sb.dtype}")
    need(sa.dim() == 1 and sa.is_contiguous() and sa.shape[0] == m,
         f"scale_a 1-D contiguous [{m}], got {tuple(sa.shape)} strides {sa.stride()}")  # fmt: skip
    need(sb.dim() == 2 and tuple(sb.shape) == (g, n) and sb.stride(1) == 1,
         f"scale_b [{g}, {n}] with stride(-1) == 1, got {tuple(sb.shape)} strides {sb.stride()}")  # fmt: skip
    need(offs.dtype == torch.int32 and offs.dim() == 1 and offs.shape[0] == g,
         f"offs int32 [{g}], got {offs.dtype} {tuple(offs.shape)}")  # fmt: skip
    need(g < 1024, f"fewer than 1024 groups, got {g}")


def expert_offsets(row_map: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The padded row map's line T + 2: int32 [E], each expert's cumulative padded end row (``offs``)."""
    return row_map[num_tokens + 2]


def _mask_spare_rows(y: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows at and after offs[-1] (not written by a grouped GEMM) set to zero, without a host sync."""
    if offs.numel() == 0:
        return torch.zeros_like(y)
    valid = torch.arange(y.shape[0], device=y.device) < offs[-1]
    return torch.where(valid.unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))


def scaled_grouped_mm_available(device) -> bool:
    """torch._scaled_grouped_mm's row-wise kernel (CUTLASS sm90) runs here: CUDA with compute capability 9.0."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def emulated_scaled_grouped_mm(q, wq, sa, sb, offs) -> torch.Tensor:
    """The FP8 GEMM in fp32 from the dequantized operands (q * sa, wq * sb), rounded once to bf16; rows after offs[-1]
    unspecified, as torch's. For devices without the scaled GEMM (the CPU); it reads offs on the host."""
    a = q.float() * sa.unsqueeze(1)
    b = wq.float() * sb.unsqueeze(1)
    out = torch.empty(q.shape[0], wq.shape[2], dtype=torch.float32, device=q.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ b[e]
        start = end
    return out.to(torch.bfloat16)


# -------------------------------------------------------------------------------------------------- the layer


def fp8_up_projection(x, routing_map, wq, sb, num_out_tokens=None, align_size=ALIGN, gemm=None):
    """Steps 1, 2, 4, 5 of the module docstring: permute_quantized -> torch._scaled_grouped_mm.

    Args:
        x: [T, H] tokens (bf16 / fp16 / fp32), H % 16 == 0. routing_map: [T, E] bool.
        wq, sb: ``quantize_weights`` of the expert weights [E, H, O] (O % 16 == 0).
        num_out_tokens: routed pairs (T * K for a top-K router; default routing_map.sum(), a host read).
        align_size: each expert's rows padded to a multiple of it (16: module docstring).
        gemm: the scaled GEMM (default: torch._scaled_grouped_mm where it runs, else ``emulated_scaled_grouped_mm``).

    Returns:
        (y [N, O] bf16, zero on padding and spare rows; q [N, H] e4m3 and sa [N] fp32, the FP8 rows and their scales
        (what a training layer keeps for the weight gradient); row_map [T + 3, E]; offs int32 [E]). With
        num_out_tokens given and torch's GEMM, nothing waits for the device.
    """
    if num_out_tokens is None:
        num_out_tokens = int(routing_map.sum())
    q, sa, _, row_map = moe_raw.permute_quantized(x, routing_map, num_out_tokens=num_out_tokens, recipe="rowwise",
                                                  fp8_dtype=FP8, align_size=align_size)  # fmt: skip
    offs = expert_offsets(row_map, x.shape[0])
    check_operands(q, wq, sa, sb, offs)
    if gemm is None:
        gemm = default_gemm(x.device)
    return _mask_spare_rows(gemm(q, wq, sa, sb, offs), offs), q, sa, row_map, offs


def default_gemm(device):
    """torch._scaled_grouped_mm where it runs (``scaled_grouped_mm_available``), else ``emulated_scaled_grouped_mm``."""
    return _torch_scaled_gemm if scaled_grouped_mm_available(device) else emulated_scaled_grouped_mm


def _torch_scaled_gemm(q, wq, sa, sb, offs):
    return torch._scaled_grouped_mm(q, wq, sa, sb, offs=offs, out_dtype=torch.bfloat16)


def bf16_up_projection(x, routing_map, w, num_out_tokens=None, align_size=ALIGN):
    """The bf16 layer on the same permuted rows: permute_and_pad (the rows, padding and row map of permute_quantized)
    then torch._grouped_mm(rows, w, offs) (fp32 accumulation, bf16 out), masked as the FP8 one.
    Returns (y [N, O] bf16, rows [N, H] bf16, row_map [T + 3, E])."""
    if num_out_tokens is None:
        num_out_tokens = int(routing_map.sum())
    rows, _, row_map, _, _ = moe_raw.permute_and_pad(x.to(torch.bfloat16), routing_map, None, align_size,
                                                     num_out_tokens)  # fmt: skip
    offs = expert_offsets(row_map, x.shape[0])
    return _mask_spare_rows(torch._grouped_mm(rows, w.to(torch.bfloat16), offs=offs), offs), rows, row_map


# ------------------------------------------------------------------------------------------------ the check


def _row_groups(offs: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[N] int64: the group of each row (len(offs) for the spare rows at and after offs[-1])."""
    return torch.searchsorted(offs.long(), torch.arange(num_rows, device=offs.device), right=True)


def _grouped_fp32(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [N, H] @ w[e] [H, O] in fp32 over each group's rows (a host loop over offs); spare rows zero."""
    out = torch.zeros(a.shape[0], w.shape[2], dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end].float() @ w[e].float()
        start = end
    return out


def error_bound(rows, w, sa, sb, offs, y_fp8, y_bf16) -> torch.Tensor:
    """The element-wise bound of the module docstring, [N, O] fp32 (0 on spare rows).

    rows: the bf16 permuted rows [N, H]; w: the bf16 weights [E, H, O]; sa [N], sb [E, O]: the FP8 scales."""
    a, wa = rows.float().abs(), w.float().abs()
    p = _grouped_fp32(a, wa, offs)  # sum_k |a_k| |b_k|
    group = _row_groups(offs, rows.shape[0])
    pad = torch.zeros_like(sb[:1])
    col_sum = torch.cat([wa.sum(1), pad])[group]  # [N, O]: sum_k |b_k| of the row's expert, per column
    sb_rows = torch.cat([sb, pad])[group]  # [N, O]
    subnormal = SUBNORMAL * (sa.unsqueeze(1) * col_sum + sb_rows * a.sum(1, keepdim=True))
    bound = ELEMENT_BOUND * p + subnormal + OUTPUT_ROUNDING * (y_fp8.float().abs() + y_bf16.float().abs())
    return _mask_spare_rows(bound, offs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius, in fp64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(x, routing_map, w, num_out_tokens=None, align_size=ALIGN, gemm=None) -> dict:
    """The FP8 up-projection against the bf16 one on the same permuted rows, with the FP8 error bound.

    Returns {"rel_err": |y_fp8 - y_bf16| / |y_bf16|, "ea", "eb": the operands' relative quantization errors,
    "rel_limit": 2 sqrt(ea^2 + eb^2) + 2^-7, "bound_ratio": max |y_fp8 - y_bf16| / bound, "within_bound":
    bound_ratio <= 1 (the element-wise bound: any data), "same_rows_as_permute_and_pad": the row map equals
    permute_and_pad's, "emulation_err": (torch's GEMM only) |y_fp8 - emulated| / |emulated|, "ok": all of them, with
    rel_err <= rel_limit (which assumes rounding errors independent of the data, as with ``make_inputs``' Gaussian
    data; a few outliers that dominate the norms break it, not the element-wise bound)}. Reads results on the host
    (a check, not the layer)."""
    if num_out_tokens is None:
        num_out_tokens = int(routing_map.sum())
    wq, sb = quantize_weights(w)
    gemm = gemm or default_gemm(x.device)
    y8, q, sa, row_map, offs = fp8_up_projection(x, routing_map, wq, sb, num_out_tokens, align_size, gemm)
    yb, rows, bf16_map = bf16_up_projection(x, routing_map, w, num_out_tokens, align_size)
    w16 = w.to(torch.bfloat16)
    ea = rel_err(moe_raw.dequantize(q, sa, "rowwise"), rows)
    eb = rel_err(wq.float() * sb.unsqueeze(1), w16)
    out = {"rel_err": rel_err(y8, yb), "ea": ea, "eb": eb, "rel_limit": 2 * math.hypot(ea, eb) + REL_SLACK}
    bound = error_bound(rows, w16, sa, sb, offs, y8, yb)
    diff = (y8.float() - yb.float()).abs()
    out["bound_ratio"] = float((diff / bound.clamp_min(1e-30)).max()) if diff.numel() else 0.0
    out["within_bound"] = out["bound_ratio"] <= 1
    out["same_rows_as_permute_and_pad"] = torch.equal(row_map, bf16_map)
    ok = out["rel_err"] <= out["rel_limit"] and out["within_bound"] and out["same_rows_as_permute_and_pad"]
    if gemm is not emulated_scaled_grouped_mm:
        emulated = _mask_spare_rows(emulated_scaled_grouped_mm(q, wq, sa, sb, offs), offs)
        out["emulation_err"] = rel_err(y8, emulated)
        ok &= out["emulation_err"] <= REL_SLACK
    out["ok"] = bool(ok and math.isfinite(out["rel_err"]))
    return out


def make_inputs(T, E, H, out_dim, K, device="cpu", seed=0):
    """Gaussian tokens [T, H] bf16, a top-K routing map [T, E] (random scores), weights [E, H, out_dim] bf16 (std
    H^-1/2)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    top = torch.randn(T, E, generator=gen).topk(K, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    w = (torch.randn(E, H, out_dim, generator=gen) / math.sqrt(H)).to(torch.bfloat16)
    return x.to(device), routing_map.to(device), w.to(device)


def run(T=256, E=8, H=256, out_dim=128, K=2, device="cpu", seed=0, align_size=ALIGN, gemm=None) -> dict:
    """``compare`` on ``make_inputs(T, E, H, out_dim, K)``: what the tests call."""
    x, routing_map, w = make_inputs(T, E, H, out_dim, K, device, seed)
    return compare(x, routing_map, w, T * K, align_size, gemm)


# --------------------------------------------------------------------------------------------------------- demo


def _ms(fn, iters: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, help="T (default 4096 on CUDA, 256 on CPU)")
    ap.add_argument("--experts", type=int, help="E (default 128 on CUDA, 8 on CPU)")
    ap.add_argument("--hidden", type=int, help="H, a multiple of 16 (default 2048 on CUDA, 256 on CPU)")
    ap.add_argument("--out", type=int, help="O = 2 F, a multiple of 16 (default 1536 on CUDA, 128 on CPU)")
    ap.add_argument("--topk", type=int, help="K (default 8 on CUDA, 2 on CPU)")
    ap.add_argument("--align", type=int, default=ALIGN, help="align_size (default 16)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    T = args.tokens or (4096 if cuda else 256)
    E = args.experts or (128 if cuda else 8)
    H = args.hidden or (2048 if cuda else 256)
    out_dim = args.out or (1536 if cuda else 128)
    K = args.topk or (8 if cuda else 2)
    gemm_name = "torch._scaled_grouped_mm" if scaled_grouped_mm_available(args.device) else "fp32 emulation"
    print(f"T={T} E={E} H={H} O={out_dim} K={K} align={args.align} on {args.device}; FP8 GEMM: {gemm_name}")
    x, routing_map, w = make_inputs(T, E, H, out_dim, K, args.device)
    res = compare(x, routing_map, w, T * K, args.align)
    print(f"rel err FP8 vs bf16 {res['rel_err']:.4f} (limit {res['rel_limit']:.4f}; operand quantization errors "
          f"{res['ea']:.4f}, {res['eb']:.4f}); max |diff| / element bound {res['bound_ratio']:.3f}")  # fmt: skip
    if "emulation_err" in res:
        print(f"rel err FP8 GEMM vs its fp32 emulation {res['emulation_err']:.2e}")
    wq, sb = quantize_weights(w)
    fp8_ms = _ms(lambda: fp8_up_projection(x, routing_map, wq, sb, T * K, args.align), args.iters, cuda)
    bf16_ms = _ms(lambda: bf16_up_projection(x, routing_map, w, T * K, args.align), args.iters, cuda)
    print(f"FP8  permute_quantized + scaled grouped GEMM  {fp8_ms:8.3f} ms (weights quantized once, outside)")
    print(f"bf16 permute_and_pad + grouped GEMM           {bf16_ms:8.3f} ms")
    print("within FP8 error" if res["ok"] else "NOT within FP8 error")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
