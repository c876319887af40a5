"""The cost model's ``multi-adapter`` method: one batch of N tokens spread over T distinct adapters of one base layer.

Every figure here is an ESTIMATE (a model, not a measurement), built with :mod:`smoa_kernels.cost_model`'s GPU classes
and roofline (a pass takes ``max(FLOPs / (peak · efficiency), bytes / (bandwidth · efficiency)) + launches ·
launch_us``). Tokens are spread evenly, ``n_a = N / T`` per adapter (uneven spreads cost the fused kernel more padding
on short segments). Methods, forward only (inference), for a ``d_out × d_in`` layer, total rank r, K blocks:

- ``base``: the frozen layer alone, ``x W0ᵀ`` once (vendor GEMM): the 1.0 line.
- ``multi-fused``: :mod:`smoa_kernels.triton.multi_adapter`, one launch. Each segment is cut into token tiles of BLOCK_N
  (the cheaper of the shipped 16 and 32, as the autotuner would pick); every tile runs the base dot and the adapter dot
  over its padded tokens (2 · 2·BLOCK_N·D² FLOPs) and regenerates the ΔW_a tiles (the rank product, 2·RANK_PAD·D² FLOPs,
  RANK_PAD = K·r_k padded to a power of two ≥ 16), at the Triton efficiency. Bytes: W0 once (the programs of one output
  tile run adjacently and share it through L2 — an assumption to be measured), x, y, and each adapter's block-extended
  factors once.
- ``multi-torch``: the torch path: the base GEMM once for all tokens (vendor), then per adapter the blocked adapter
  term (:mod:`smoa_kernels.cost_model`'s ``smoa-blocked`` forward minus its base GEMM: gather, ΔW_k generation
  — D²/K elements written and read per adapter —, K block GEMMs on n_a tokens, scatter-add) plus one segment-table
  pass and one host read of the offsets (counted as one launch).
- ``sequential``: T single-adapter calls on the fused path (``smoa-fused`` inference at n_a tokens each): what a
  per-sub-batch loop costs today — one full pass over W0 per distinct adapter (plus gathering and scattering the
  sub-batches when T > 1).
- ``peft-lora-mixed``: PEFT LoRA's mixed-batch forward at rank r/K (the same trainable parameters): the base layer
  once for the whole batch, then per adapter two skinny GEMMs on its sub-batch and an indexed add. Not a Hadamard
  adapter (no W0 in the adapter term): the floor a LoRA server reaches, shown for scale.

``python -m smoa_kernels.cost_model_multi`` prints the table (markdown) of docs/multi_adapter.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from smoa_kernels import cost_model as cm

__all__ = ["ADAPTER_COUNTS", "METHODS", "TOKEN_COUNTS", "estimate", "markdown_table", "passes", "table"]

METHODS = ("base", "multi-fused", "multi-torch", "sequential", "peft-lora-mixed")
ADAPTER_COUNTS = (1, 2, 4, 8, 16, 32)
TOKEN_COUNTS = (64, 2048)
BLOCKS = (2, 4)
BLOCK_NS = (16, 32)  # the token tiles of smoa_kernels.triton.multi_adapter.CONFIGS
LABEL = "ESTIMATE from smoa_kernels.cost_model_multi (a model, not a measurement)"


def _repeated(p: cm.Pass, times: int, what: str) -> cm.Pass:
    """``p`` run ``times`` times (once per adapter or sub-batch): FLOPs, bytes, gathered elements and launches scale,
    each launch keeps its grid."""
    return dataclasses.replace(p, name=f"{p.name} (×{times} {what})", flops=p.flops * times, bytes=p.bytes * times,
                               gathered=p.gathered * times, launches=p.launches * times)  # fmt: skip


def _rank_pad(rank: int) -> int:
    return max(16, 1 << max(rank - 1, 0).bit_length())


def passes(method: str, n_tokens: int, n_adapters: int, d_out: int, d_in: int, rank: int, num_blocks: int,
           element_bytes: int = 2, gpu: str = "h100") -> list[cm.Pass]:  # fmt: skip
    """The modelled passes (with their estimated ``seconds``) of ``method`` for N tokens over T adapters."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")
    for name, value in (("n_tokens", n_tokens), ("n_adapters", n_adapters), ("num_blocks", num_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    g = cm.GPUS[gpu]
    e, f = element_bytes, cm.FACTOR_BYTES
    w = d_out * d_in
    T = n_adapters
    n_a = n_tokens / T
    r_k = rank // num_blocks
    out: list[cm.Pass] = []
    if method == "base":
        out = [cm._gemm("base GEMM x·W0ᵀ", n_tokens, d_out, d_in, e)]
    elif method == "multi-fused":
        pad = _rank_pad(num_blocks * r_k)
        data = e * (w + n_tokens * (d_in + d_out)) + T * e * pad * (d_in + d_out)
        candidates = []
        for block_n in BLOCK_NS:  # the autotuner picks among the shipped token tiles: the cheaper one is modelled
            tiles = T * math.ceil(n_a / block_n)
            flops = tiles * (2 * 2.0 * block_n * w + 2.0 * pad * w)
            name = f"multi-adapter fused GEMM (all segments, ΔW_a in registers, BLOCK_N={block_n})"
            candidates.append(cm._timed(cm.Pass(name, "triton", flops, data), g, e))
        out = [min(candidates, key=lambda p: p.seconds)]
    elif method == "multi-torch":
        out = [
            cm._gemm("base GEMM x·W0ᵀ (all tokens)", n_tokens, d_out, d_in, e),
            cm.Pass("segment table (sort, counts) + host read of the offsets", "memory", 0, 16 * n_tokens, 2),
        ]
        blocked = cm._forward("smoa-blocked", max(1, round(n_a)), d_out, d_in, rank, num_blocks, e, False, keep=False)
        for p in blocked:
            if "x·W0ᵀ" not in p.name:  # its base GEMM runs once for all tokens, above
                out.append(_repeated(p, T, "adapters"))
        out.append(cm.Pass(f"gather the segments' rows (×{T})", "memory", 0, 2 * e * n_tokens * d_in, T))
    elif method == "sequential":
        for p in cm._forward("smoa-fused", max(1, round(n_a)), d_out, d_in, rank, num_blocks, e, False, keep=False):
            out.append(_repeated(p, T, "sub-batches"))
        if T > 1:
            out.append(cm.Pass(f"gather/scatter the sub-batches (×{T})", "memory", 0,
                               2 * e * n_tokens * (d_in + d_out), 2 * T))  # fmt: skip
    else:  # peft-lora-mixed
        rho = rank // num_blocks
        out = [cm._gemm("base layer (whole batch)", n_tokens, d_out, d_in, e)]
        for p in (
            cm._gemm("sub_x·Aᵀ", n_a, rho, d_in, e),
            cm._gemm("(sub_x·Aᵀ)·Bᵀ", n_a, d_out, rho, e),
            cm.Pass("index, scale, result[idx] += lora", "memory", 0, 5 * e * n_a * d_out + e * n_a * d_in, 3),
        ):
            out.append(_repeated(p, T, "adapters"))
        del f
    return [cm._timed(p, g, e) for p in out]


def estimate(method: str, n_tokens: int, n_adapters: int, d_out: int = 4096, d_in: int = 4096, rank: int = 32,
             num_blocks: int = 2, element_bytes: int = 2, gpu: str = "h100") -> float:  # fmt: skip
    """Estimated seconds of ``method`` (the sum of its :func:`passes`). A model, not a measurement."""
    return sum(p.seconds for p in passes(method, n_tokens, n_adapters, d_out, d_in, rank, num_blocks, element_bytes,
                                         gpu))  # fmt: skip


def table(gpu: str = "h100", d: int = 4096, rank: int = 32) -> dict:
    """``{label, rows: [{N, K, T, <method>_us..., multi_vs_base, sequential_vs_multi}]}`` over
    :data:`TOKEN_COUNTS` × :data:`BLOCKS` × :data:`ADAPTER_COUNTS` (bf16, d × d, total rank r)."""
    rows = []
    for n in TOKEN_COUNTS:
        for k in BLOCKS:
            for t in ADAPTER_COUNTS:
                us = {m: estimate(m, n, t, d, d, rank, k, 2, gpu) * 1e6 for m in METHODS}
                best = min(us["multi-fused"], us["multi-torch"])
                rows.append({"N": n, "K": k, "T": t, **{f"{m}_us": round(v, 1) for m, v in us.items()},
                             "best_multi_vs_base": round(best / us["base"], 2),
                             "sequential_vs_best_multi": round(us["sequential"] / best, 2)})  # fmt: skip
    return {"label": f"{LABEL}: {cm.GPUS[gpu].name}, bf16, {d}x{d}, r={rank}, forward only", "rows": rows}


def markdown_table(gpu: str = "h100") -> str:
    data = table(gpu)
    lines = [f"{data['label']}; times in µs", "",
             "| N | K | T | base | multi-fused | multi-torch | sequential (T fused passes) | PEFT LoRA mixed (r/K) | "
             "best multi / base | sequential / best multi |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(f"| {r['N']} | {r['K']} | {r['T']} | {r['base_us']} | {r['multi-fused_us']} | "
                     f"{r['multi-torch_us']} | {r['sequential_us']} | {r['peft-lora-mixed_us']} | "
                     f"{r['best_multi_vs_base']}× | {r['sequential_vs_best_multi']}× |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="multi-adapter cost model (estimates)")
    parser.add_argument("--gpu", default="h100", choices=tuple(cm.GPUS))
    parser.add_argument("--json", metavar="PATH", help="write the table as JSON")
    args = parser.parse_args(argv)
    print(markdown_table(args.gpu))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(table(args.gpu), handle, indent=1)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
