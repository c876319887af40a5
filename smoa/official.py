"""``smoa import-official``: convert a checkpoint of the authors' SMoA code into a normal smoa PEFT adapter folder.

The authors' code (misonsky/SMoA) saves, PEFT-style, per-block factors and no spectral orders — it re-runs the SVD of
W0 when it loads. What this importer reads (assumptions, documented in docs/migrating.md):

- weights: ``adapter_model.safetensors`` if present, else ``adapter_model.bin`` (a pickle, read with
  ``torch.load(weights_only=True)``: tensors only, no code runs); keys
  ``[base_model.model.]<module path>.lora_A[.<adapter>].{k}.weight`` (``A_k``: r_k×|C_k|) and ``…lora_B….{k}.weight``
  (``B_k``: |R_k|×r_k), k = 0..K-1; the ``base_model.model.`` prefix and an adapter-name segment are optional.
- ``adapter_config.json``: ``r`` (the total rank, Σ r_k), ``lora_alpha`` (s = lora_alpha / r; default r),
  ``lora_dropout``, ``fan_in_fan_out``, ``task_type``, ``base_model_name_or_path``; the written ``target_modules`` are
  the exact module paths that have factors (the official list may name more); K is the number of block indices in
  the weights, checked against a K field of the config if it has one (``num_blocks``, ``n_blocks``, ``block_num``,
  ``num_experts`` or ``K``) and against ``num_blocks=`` / ``--num-blocks`` when given.
- W0 of every adapted module comes from the base model folder's ``*.safetensors`` (or ``pytorch_model*.bin``, read
  with ``weights_only=True``) under the key ``<module path>.weight`` — matched exactly, or as the one key that ends
  with it or that it ends with (a head model's ``bert.`` prefix and the like).

The orders are derived with the official rule, :func:`smoa.partition.spectral_orders` with ``method="svd"``
(SPEC §1: an economy SVD in ``svd_dtype``, energy-weighted mean spectral index, stable ascending sort), and saved with
the adapter so they are never re-derived. A group of (near-)tied scores that straddles a block boundary is reported:
there the authors' own re-derivation may put an index in the other block (an unstable sort, another SVD), so such a
layer may not reproduce the authors' model exactly.

Uneven block ranks (``r % K ≠ 0``, or per-block ranks) convert as they are: the adapter keeps the authors' per-block
ranks (``block_ranks`` in the written config; ``rank_pattern`` where modules differ), zero-padded to the largest in
the LoRA-shaped factors.

Only the standard library is imported at module top (``smoa --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ImportReport", "TieGroup", "import_official", "register"]

K_FIELDS = ("num_blocks", "n_blocks", "block_num", "num_experts", "K")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[A-Za-z_][^.]*))?"
    r"\.(?P<block>\d+)\.weight$"
)


@dataclass
class TieGroup:
    """Scores within ``tolerance`` of their neighbours in the sorted order, spanning the boundary after position
    ``boundary - 1``: which of them land in block k or k+1 depends on a tie-break a re-derivation may not share."""

    module: str
    axis: str  # "rows" or "cols"
    boundary: int  # position in the sorted order where block k+1 starts
    indices: list[int]  # the original indices of the group, in the order used
    scores: list[float]

    def __str__(self) -> str:
        span = f"{min(self.scores):.6g}..{max(self.scores):.6g}"
        return (
            f"{self.module}: {len(self.indices)} {self.axis} with scores {span} straddle the block boundary at "
            f"sorted position {self.boundary} (indices {self.indices[:8]}{' ...' if len(self.indices) > 8 else ''})"
        )


@dataclass
class ImportReport:
    """What :func:`import_official` wrote."""

    destination: str
    modules: list[str]
    num_blocks: int
    r: int
    lora_alpha: float
    ties: list[TieGroup] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"wrote {self.destination}: {len(self.modules)} SMoA layers, K={self.num_blocks}, r={self.r}, "
            f"lora_alpha={self.lora_alpha:g}"
        ]
        if self.ties:
            lines.append(
                f"warning: {len(self.ties)} tie group(s) of spectral scores straddle a block boundary; the authors' "
                "code re-deriving its orders may assign these indices to the neighbouring block:"
            )
            lines += [f"  - {tie}" for tie in self.ties]
        else:
            lines.append("no tie group of spectral scores straddles a block boundary: the orders are unambiguous")
        return "\n".join(lines)


# ---- reading ---------------------------------------------------------------------------------------------------------
def _read_tensors(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # an unsafe pickle (code, custom classes) or a corrupt file
        raise ValueError(f"{path} cannot be read safely with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat dict of tensors (got {type(state).__name__})")
    return state


def _adapter_weights(src: Path) -> tuple[Path, dict[str, Any]]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (src / name).is_file():
            return src / name, _read_tensors(src / name)
    raise FileNotFoundError(f"src={str(src)!r} holds neither adapter_model.safetensors nor adapter_model.bin")


def _parse_blocks(weights: dict[str, Any], source: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """``{module path: {k: {"A": A_k, "B": B_k}}}``; raises ``ValueError`` on unknown keys or mixed adapters."""
    modules: dict[str, dict[int, dict[str, Any]]] = {}
    unknown, adapters = [], set()
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        adapters.add(match["adapter"])
        block = modules.setdefault(match["module"], {}).setdefault(int(match["block"]), {})
        block[match["factor"]] = tensor
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} keys are not SMoA block factors '<module>.lora_A|lora_B.<k>.weight', e.g. "
            f"{sorted(unknown)[:3]} (modules_to_save and other extra tensors are not imported)"
        )
    if not modules:
        raise ValueError(f"{source} holds no SMoA block factors")
    if len(adapters) > 1:
        raise ValueError(f"{source} holds several adapters {sorted(map(str, adapters))}; import one at a time")
    return modules


class _BaseWeights:
    """Lazy access to the base model folder's tensors by module path (safetensors shards or a weights-only .bin)."""

    def __init__(self, base: Path) -> None:
        if not base.is_dir():
            raise FileNotFoundError(f"base={str(base)!r} is not a model folder")
        self.files = sorted(base.glob("*.safetensors")) or sorted(base.glob("pytorch_model*.bin"))
        if not self.files:
            raise FileNotFoundError(f"base={str(base)!r} holds no *.safetensors or pytorch_model*.bin weights")
        self.index: dict[str, Path] = {}
        self._loaded: dict[Path, dict[str, Any]] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    self.index.update(dict.fromkeys(handle.keys(), path))
            else:
                self._loaded[path] = _read_tensors(path)
                self.index.update(dict.fromkeys(self._loaded[path], path))
        self.base = base

    def key_for(self, module: str) -> str:
        wanted = f"{module}.weight"
        if wanted in self.index:
            return wanted
        candidates = [k for k in self.index if k.endswith("." + wanted) or wanted.endswith("." + k)]
        if len(candidates) != 1:
            found = "no key" if not candidates else f"several keys {candidates[:3]}"
            raise KeyError(f"the base model {str(self.base)!r} has {found} matching {wanted!r}")
        return candidates[0]

    def weight(self, module: str):
        key = self.key_for(module)
        path = self.index[key]
        if path in self._loaded:
            return self._loaded[path][key]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)


# ---- the conversion --------------------------------------------------------------------------------------------------
def _tie_groups(module: str, axis: str, scores, order, num_blocks: int, tolerance: float) -> list[TieGroup]:
    from smoa_kernels.blocks import block_bounds

    sorted_scores = scores[order].tolist()
    groups = []
    for start, _ in block_bounds(len(sorted_scores), num_blocks)[1:]:
        if abs(sorted_scores[start] - sorted_scores[start - 1]) > tolerance:
            continue
        lo, hi = start - 1, start
        while lo > 0 and abs(sorted_scores[lo] - sorted_scores[lo - 1]) <= tolerance:
            lo -= 1
        while hi + 1 < len(sorted_scores) and abs(sorted_scores[hi + 1] - sorted_scores[hi]) <= tolerance:
            hi += 1
        indices = order[lo : hi + 1].tolist()
        groups.append(TieGroup(module, axis, start, indices, sorted_scores[lo : hi + 1]))
    return groups


def _block_list(module: str, blocks: dict[int, dict[str, Any]], num_blocks: int) -> list[tuple[Any, Any]]:
    if sorted(blocks) != list(range(num_blocks)):
        raise ValueError(f"{module}: block indices {sorted(blocks)}, expected 0..{num_blocks - 1}")
    out = []
    for k in range(num_blocks):
        if set(blocks[k]) != {"A", "B"}:
            raise ValueError(f"{module}: block {k} has {sorted(blocks[k])} but needs both lora_A and lora_B")
        A_k, B_k = blocks[k]["A"], blocks[k]["B"]
        if A_k.dim() != 2 or B_k.dim() != 2 or A_k.shape[0] != B_k.shape[1]:
            raise ValueError(f"{module}: block {k} has A {tuple(A_k.shape)} and B {tuple(B_k.shape)} (need r_k×|C_k|, "
                             "|R_k|×r_k)")  # fmt: skip
        out.append((A_k, B_k))
    return out


def import_official(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    base: str | os.PathLike,
    num_blocks: int | None = None,
    svd_dtype: str = "float32",
    tie_tolerance: float = 1e-6,
    overwrite: bool = False,
) -> ImportReport:
    """Convert the authors' SMoA checkpoint folder ``src`` into a smoa PEFT adapter folder ``dst``.

    Args:
        src: folder with ``adapter_config.json`` and ``adapter_model.bin`` (or ``.safetensors``), per-block factors.
        dst: the adapter folder to write (``adapter_model.safetensors`` with factors and orders, and an
            ``adapter_config.json`` with ``peft_type: SMOA``); load it with ``PeftModel.from_pretrained``.
        base: the base model folder the adapter was trained on (its W0 defines the spectral orders).
        num_blocks: K; checked against the number of blocks in the weights (and the config's K field, if any).
        svd_dtype: ``"float32"`` (the official rule's precision) or ``"float64"``.
        tie_tolerance: scores closer than this (in spectral-index units) count as tied for the report.
        overwrite: replace an existing non-empty ``dst``.

    Returns an :class:`ImportReport` (modules, K, r, lora_alpha, tie groups straddling a block boundary). On any
    error nothing is written.
    """
    import torch

    from smoa.checkpoint import partition_info
    from smoa.factors import resolve_block_ranks
    from smoa.partition import spectral_scores
    from smoa.peft import SMoAConfig
    from smoa_kernels.reference import blocks_to_lora

    src, dst, base = Path(src), Path(dst), Path(base)
    if svd_dtype not in ("float32", "float64"):
        raise ValueError(f"svd_dtype={svd_dtype!r} is not one of ('float32', 'float64')")
    if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1):
        raise ValueError(f"num_blocks={num_blocks!r} must be a positive int")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"dst={str(dst)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    config_path = src / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"src={str(src)!r} has no adapter_config.json")
    official = json.loads(config_path.read_text())
    weights_path, weights = _adapter_weights(src)
    modules = _parse_blocks(weights, weights_path)

    counts = {module: len(blocks) for module, blocks in modules.items()}
    K = max(counts.values())
    if len(set(counts.values())) > 1:
        raise ValueError(f"{weights_path}: the modules have different block counts {sorted(set(counts.values()))}")
    config_K = next((official[name] for name in K_FIELDS if official.get(name) is not None), None)
    for name, value in (("num_blocks", num_blocks), (f"adapter_config.json's K field ({config_K})", config_K)):
        if value is not None and int(value) != K:
            raise ValueError(f"{name}={value} does not match the {K} blocks per module in {weights_path}")
    block_lists = {module: _block_list(module, blocks, K) for module, blocks in modules.items()}
    total_ranks = {module: sum(A_k.shape[0] for A_k, _ in blocks) for module, blocks in block_lists.items()}
    r = official.get("r")
    if r is None or len(set(total_ranks.values())) > 1:
        raise ValueError(
            f"adapter_config.json r={r!r}; the total block ranks per module are {sorted(set(total_ranks.values()))} "
            "(a per-module rank pattern is not supported by the importer)"
        )
    if int(r) != next(iter(total_ranks.values())):
        raise ValueError(f"adapter_config.json r={r} but the blocks' ranks sum to {next(iter(total_ranks.values()))}")
    alpha = float(official.get("lora_alpha") if official.get("lora_alpha") is not None else r)
    fan_in_fan_out = bool(official.get("fan_in_fan_out", False))
    dtype = torch.float64 if svd_dtype == "float64" else torch.float32

    base_weights = _BaseWeights(base)
    state: dict[str, torch.Tensor] = {}
    ties: list[TieGroup] = []
    for module in sorted(modules):
        weight = base_weights.weight(module)
        weight = weight.T if fan_in_fan_out else weight
        blocks = block_lists[module]
        # the authors' literal rule: an economy SVD in svd_dtype (float32 by default, as their code re-derives it)
        score_row, score_col = spectral_scores(weight, dtype, method="svd")
        row_order = torch.argsort(score_row, stable=True)  # = spectral_orders(weight, dtype, method="svd")
        col_order = torch.argsort(score_col, stable=True)
        expected = [
            (len(R), len(C)) for R, C in zip(torch.tensor_split(row_order, K), torch.tensor_split(col_order, K))
        ]
        got = [(B_k.shape[0], A_k.shape[1]) for A_k, B_k in blocks]
        if got != expected:
            raise ValueError(
                f"{module}: block shapes (|R_k|, |C_k|) {got} do not fit W0 {tuple(weight.shape)} split into K={K} "
                f"blocks {expected} (another base model, or fan_in_fan_out={fan_in_fan_out} is wrong?)"
            )
        ties += _tie_groups(module, "rows", score_row, row_order, K, tie_tolerance)
        ties += _tie_groups(module, "cols", score_col, col_order, K, tie_tolerance)
        factor_dtype = blocks[0][0].dtype  # uneven block ranks are zero-padded to the largest (SPEC §3 layout)
        lora_A, lora_B = blocks_to_lora([(A.to(factor_dtype), B.to(factor_dtype)) for A, B in blocks], row_order,
                                        col_order)  # fmt: skip
        prefix = f"base_model.model.{module}"
        state[f"{prefix}.smoa_A.weight"] = lora_A.contiguous()
        state[f"{prefix}.smoa_B.weight"] = lora_B.contiguous()
        state[f"{prefix}.smoa_row_order"] = row_order.to(torch.long)
        state[f"{prefix}.smoa_col_order"] = col_order.to(torch.long)
        state[f"{prefix}.smoa_partition_info"] = partition_info(weight, K, int(r), "spectral")  # K, r, shape, W0 print

    # the exact module paths that have factors (the official target_modules may name more, e.g. with
    # layers_to_transform): the adapter then attaches exactly where the checkpoint has factors
    target_modules = sorted(modules)
    # per-block ranks: the authors' split of r (r // K each, the first r % K blocks one more) needs nothing; another
    # split shared by every module is `block_ranks`; splits that differ between modules go into rank_pattern
    ranks = {module: [A_k.shape[0] for A_k, _ in blocks] for module, blocks in block_lists.items()}
    default = list(resolve_block_ranks(int(r), K))
    other = {module: split for module, split in ranks.items() if split != default}
    shared = next(iter(other.values())) if other and len(other) == len(ranks) else None
    if shared is not None and any(split != shared for split in other.values()):
        shared = None
    config = SMoAConfig(
        r=int(r),
        num_blocks=K,
        lora_alpha=alpha,
        lora_dropout=float(official.get("lora_dropout", 0.0) or 0.0),
        target_modules=target_modules,
        fan_in_fan_out=fan_in_fan_out,
        svd_dtype=svd_dtype,
        base_model_name_or_path=str(official.get("base_model_name_or_path") or base),
        task_type=official.get("task_type"),
        inference_mode=True,
        block_ranks=shared,
        rank_pattern={} if shared is not None else other,
    )
    _write(dst, config, state, overwrite)
    return ImportReport(str(dst), sorted(modules), K, int(r), alpha, ties)


def _write(dst: Path, config, state, overwrite: bool) -> None:
    """Write into a fresh sibling folder, then move it into place: a failure leaves ``dst`` as it was."""
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        save_file(state, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        if dst.exists():
            if not overwrite:
                raise FileExistsError(f"dst={str(dst)!r} appeared while converting")
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---- the command -----------------------------------------------------------------------------------------------------
def _command(args: argparse.Namespace) -> int:
    report = import_official(
        args.src, args.dst, args.base, num_blocks=args.num_blocks, svd_dtype=args.svd_dtype,
        tie_tolerance=args.tie_tolerance, overwrite=args.overwrite,
    )  # fmt: skip
    print(report.summary())
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-official",
        help="convert a checkpoint of the authors' SMoA code into a smoa PEFT adapter folder",
        description="Read SRC (the authors' adapter_config.json + adapter_model.bin/.safetensors with per-block "
        "lora_A.{k}/lora_B.{k} factors), derive the spectral orders from the base model's weights with the official "
        "rule, and write a smoa PEFT adapter folder DST (safetensors, orders included). Reports tie groups of scores "
        "that straddle a block boundary.",
    )
    parser.add_argument("src", help="the authors' adapter folder")
    parser.add_argument("dst", help="the smoa adapter folder to write")
    parser.add_argument("--base", required=True, help="the base model folder (its *.safetensors hold W0)")
    parser.add_argument("--num-blocks", type=int, help="K; checked against the blocks in SRC (default: from SRC)")
    parser.add_argument("--svd-dtype", default="float32", choices=("float32", "float64"), help="SVD precision")
    parser.add_argument(
        "--tie-tolerance", type=float, default=1e-6, help="scores this close count as tied (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.set_defaults(func=_command)
