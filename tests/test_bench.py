"""``smoa bench`` on tiny CPU shapes: floors, the correctness guard, bad input, skips, OOM, and the CLI end to end."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from smoa.bench import (
    CSV_COLUMNS,
    PROVIDERS,
    TOLERANCES,
    BenchConfig,
    BenchInputs,
    Provider,
    build_case,
    flop_floor,
    register_provider,
    run_bench,
)
from smoa.bench.flops import diagonal_block_area
from smoa.cli import main

pytest.importorskip("peft")

TINY = {"shapes": ((64, 48),), "tokens": (32,), "ranks": (4,), "blocks": (2,), "min_time": 0.005, "reps": 1}
CPU_PROVIDERS = ("frozen", "lora", "lora-eq", "hira", "reference", "smoa-torch")


# ---- FLOP floors (KERNELS.md §1) against hand-computed numbers ------------------------------------------------------
N, D = 2048, 1024  # the CPU default: N·D² = 2³¹


@pytest.mark.parametrize(
    ("family", "rank", "num_blocks", "full"),
    [
        ("frozen", 0, 2, 4 * 2**31),  # 4ND² = 8_589_934_592
        ("lora", 32, 2, 4 * 2**31 + 12 * N * D * 32),  # 4ND² + 12NDr = 9_395_240_960
        ("reference", 16, 2, 10 * 2**31),  # ≈10ND² = 21_474_836_480
        ("hira", 16, 2, 10 * 2**31),  # dense ΔW like the reference
        ("smoa", 16, 2, 7 * 2**31),  # (4 + 6/K)ND², K = 2: 15_032_385_536
        ("smoa", 8, 4, 11 * 2**31 // 2),  # K = 4: 5.5ND²
        ("smoa-merged-weight", 16, 2, 5 * 2**31),  # (4 + 2/K)ND²
    ],
)
def test_full_step_floor_matches_the_kernels_table(family, rank, num_blocks, full):
    assert flop_floor(family, "full", N, D, D, rank, num_blocks) == full


def test_floor_modes_split_and_merged_inference():
    assert flop_floor("frozen", "forward", N, D, D, 0, 1) == 2 * 2**31
    assert flop_floor("lora", "backward", N, D, D, 8, 1) == 2 * 2**31 + 4 * N * 8 * 2 * D
    assert flop_floor("smoa", "forward", N, D, D, 16, 2) == 3 * 2**31  # 2NP + 2NP/K
    assert flop_floor("smoa", "backward", N, D, D, 16, 2) == 4 * 2**31  # 2NP + 4NP/K
    assert flop_floor("smoa", "inference", N, D, D, 16, 2) == 3 * 2**31
    assert flop_floor("smoa", "inference", N, D, D, 16, 2, merged=True) == 2 * 2**31
    assert flop_floor("lora", "forward", 10, 6, 4, 2, 1) == 2 * 10 * 24 + 2 * 10 * 2 * 10  # non-square: P=24, S=10
    with pytest.raises(ValueError, match="mode='sideways'"):
        flop_floor("smoa", "sideways", N, D, D, 16, 2)


def test_diagonal_block_area_follows_tensor_split():
    assert diagonal_block_area(5, 3, 2) == 3 * 2 + 2 * 1  # columns 3+2, rows 2+1 (first chunks hold one more)
    assert diagonal_block_area(1024, 1024, 4) == 1024 * 1024 // 4


# ---- the correctness guard -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_inputs():
    return BenchInputs.make(d_in=64, d_out=48, tokens=32, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_provider_matches_its_oracle_on_the_bench_inputs(tiny_inputs, provider):
    case = build_case(provider, tiny_inputs, r=4, num_blocks=2)
    error, saved = case.check()
    assert error <= 1e-5, f"{provider}: {error}"
    assert saved is not None and saved >= 0
    y = case.step("forward")()
    assert y.shape == (32, 48)


def test_smoa_torch_matches_the_reference_output(tiny_inputs):
    """The SMoA providers are compared with smoa_linear_reference on the very tensors they time."""
    reference = build_case("reference", tiny_inputs, r=4, num_blocks=2)
    fast = build_case("smoa-torch", tiny_inputs, r=4, num_blocks=2)
    merged = build_case("smoa-torch", tiny_inputs, r=4, num_blocks=2, variant="merged")
    expected = reference.step("inference")()
    torch.testing.assert_close(fast.step("inference")(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.step("inference")(), expected, rtol=1e-4, atol=1e-5)
    assert (expected - torch.nn.functional.linear(tiny_inputs.x, tiny_inputs.base.weight)).abs().max() > 0.1


def test_guard_catches_a_wrong_answer(tiny_inputs):
    case = build_case("smoa-torch", tiny_inputs, r=4, num_blocks=2)
    frozen_oracle = build_case("frozen", tiny_inputs, r=4, num_blocks=2).built
    wrong = dataclasses.replace(
        case, built=dataclasses.replace(case.built, oracle=frozen_oracle.oracle, oracle_key=("x",))
    )
    error, _ = wrong.check()
    assert error > TOLERANCES[torch.float32]


def test_saved_activations_show_the_dense_delta_weight(tiny_inputs):
    """HiRA keeps x and a d_out×d_in tensor for backward; LoRA keeps x; SMoA's blockwise path a gathered copy of x;
    the frozen layer nothing (no weight gradient, so x is not needed)."""
    saved = {
        p: build_case(p, tiny_inputs, r=4, num_blocks=2).check()[1] for p in ("frozen", "lora", "hira", "smoa-torch")
    }
    x_bytes, w_bytes = 32 * 64 * 4, 64 * 48 * 4
    assert saved["frozen"] == 0
    assert x_bytes <= saved["lora"] < x_bytes + w_bytes
    assert saved["hira"] >= x_bytes + w_bytes
    assert x_bytes <= saved["smoa-torch"] < x_bytes + w_bytes


# ---- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("providers", ("frozen", "qlora"), "provider 'qlora' is unknown; choose from frozen, lora"),
        ("modes", ("sideways",), "mode 'sideways' is unknown; choose from forward, backward, full, inference"),
        ("dtype", "int8", "dtype='int8' is not supported; choose one of"),
        ("ranks", (6,), "rank r=6 is not divisible by blocks K=4"),
        ("device", "tpu", "device='tpu'"),
    ],
)
def test_config_errors_name_the_bad_value(field, value, message):
    config = BenchConfig(**{"device": "cpu", "blocks": (4,), field: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.resolve()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--providers", "frozen,qlora"], "unknown provider 'qlora'; choose from frozen, lora, lora-eq, hira"),
        (["--modes", "sideways"], "unknown mode 'sideways'; choose from forward, backward, full, inference"),
        (["--dtype", "int8"], "unknown dtype 'int8'; choose from float32"),
        (["--shapes", "12by4"], "must be D_INxD_OUT"),
    ],
)
def test_cli_rejects_unknown_names_with_the_choices(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--device", "cuda", "--no-progress"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_cuda_only_provider_is_skipped_on_cpu_with_its_reason(tmp_path):
    reason = PROVIDERS["smoa-triton"].unavailable(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason and "interpreter" in reason
    messages = []
    result = run_bench(
        BenchConfig(device="cpu", providers=("frozen", "smoa-triton"), modes=("forward",), csv=False, plot=False,
                    **TINY),
        progress=False, log=messages.append,
    )  # fmt: skip
    statuses = {row["provider"]: row["status"] for row in result.rows}
    assert statuses["frozen"] == "ok"
    assert statuses["smoa-triton"] == f"skipped: {reason}"
    assert any("skipping smoa-triton" in m for m in messages)
    assert not result.failed


def test_out_of_memory_is_reported_and_the_run_goes_on():
    def build(inputs, r, num_blocks):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")

    register_provider(Provider("oom-test", "frozen", "always out of memory", build, lambda r, K: 0, ""))
    try:
        result = run_bench(
            BenchConfig(device="cpu", providers=("oom-test", "frozen"), modes=("forward", "inference"), csv=False,
                        plot=False, **TINY),
            progress=False, log=lambda text: None,
        )  # fmt: skip
    finally:
        del PROVIDERS["oom-test"]
    statuses = {(row["provider"], row["mode"]): row["status"] for row in result.rows}
    assert statuses[("oom-test", "forward")] == statuses[("oom-test", "inference")] == "oom"
    assert statuses[("frozen", "forward")] == statuses[("frozen", "inference")] == "ok"
    assert not result.failed


# ---- the command end to end ----------------------------------------------------------------------------------------
def test_help_documents_providers_modes_columns_and_floors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    expected = (*PROVIDERS, "forward", "backward", "full", "inference", "--quick", "--reps", "--min-time",
                "--output-dir", "--no-plot", "p20/p80", "TFLOP/s", "peak MiB", "2NP + 4NP_K", "1024x1024")  # fmt: skip
    for text in expected:
        assert text in out, text


def test_tiny_run_writes_csv_and_png(tmp_path, capsys):
    argv = ["bench", "--device", "cpu", "--shapes", "64x48", "--tokens", "16,32", "--rank", "4", "--blocks", "2",
            "--providers", "frozen,lora,smoa-torch,smoa-triton", "--min-time", "0.005", "--reps", "1",
            "--output-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "smoa-torch [merged]" in out and "x frozen" in out and "skipped" in out
    csv_path = tmp_path / "smoa_bench.csv"
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    # 2 N × (frozen 4 + lora 4 + smoa-torch 4+1 + smoa-triton 4+1 modes)
    assert len(rows) == 2 * 18
    ok = [row for row in rows if row["status"] == "ok"]
    assert {row["provider"] for row in ok} == {"frozen", "lora", "smoa-torch"}
    for row in ok:
        assert float(row["median_ms"]) > 0 and float(row["p20_ms"]) <= float(row["p80_ms"])
        assert row["mem_kind"] == "cpu-alloc-peak" and float(row["floor_gflop"]) > 0
        assert float(row["max_rel_err"]) <= TOLERANCES[torch.float32]
        assert row["torch"] == torch.__version__ and row["command"].startswith("smoa bench --device cpu")
    frozen = [row for row in ok if row["provider"] == "frozen"]
    assert all(float(row["x_frozen"]) == 1.0 for row in frozen)
    assert (tmp_path / f"smoa_bench_cpu_64x48_float32_t{torch.get_num_threads()}.png").stat().st_size > 1000
    again = [*argv[: argv.index("--providers")], "--providers", "frozen", "--modes", "forward", "--tokens", "16"]
    assert main([*again, "--output-dir", str(tmp_path), "--no-plot", "--no-progress"]) == 0
    with open(csv_path) as handle:  # the second run appended under the same header
        assert len(list(csv.DictReader(handle))) == 2 * 18 + 1


def test_interrupted_run_still_writes_what_it_measured(tmp_path):
    def build(inputs, r, num_blocks):
        raise KeyboardInterrupt

    register_provider(Provider("ctrl-c", "frozen", "interrupts the run", build, lambda r, K: 0, ""))
    try:
        result = run_bench(
            BenchConfig(device="cpu", providers=("frozen", "ctrl-c"), modes=("forward",), output_dir=tmp_path,
                        plot=False, **TINY),
            progress=False, log=lambda text: None,
        )  # fmt: skip
    finally:
        del PROVIDERS["ctrl-c"]
    assert result.interrupted
    statuses = {row["provider"]: row["status"] for row in result.rows}
    assert statuses == {"frozen": "interrupted", "ctrl-c": "interrupted"}  # built, never timed
    with open(tmp_path / "smoa_bench.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_device_defaults(monkeypatch):
    cpu = BenchConfig(device="cpu").resolve()
    assert (cpu.dtype, cpu.shapes, cpu.tokens, cpu.ranks, cpu.blocks) == (
        "float32",
        ((1024, 1024),),
        (2048,),
        (32,),
        (2,),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve() only: nothing touches a GPU
    cuda = BenchConfig(device="auto").resolve()
    assert cuda.device == "cuda" and cuda.dtype == "bfloat16"
    assert cuda.shapes == ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4096, 1024))
    assert (cuda.tokens, cuda.ranks, cuda.blocks) == ((512, 2048, 8192, 16384), (8, 32), (1, 2, 4))
    assert "smoa-triton" in cuda.providers and cuda.modes == ("forward", "backward", "full", "inference")


def test_a_failing_provider_is_an_error_row_not_a_crash():
    def build(inputs, r, num_blocks):
        raise TypeError("this provider is broken")

    register_provider(Provider("broken", "frozen", "raises", build, lambda r, K: 0, ""))
    messages = []
    try:
        result = run_bench(
            BenchConfig(device="cpu", providers=("broken", "frozen"), modes=("forward",), csv=False, plot=False,
                        **TINY),
            progress=False, log=messages.append,
        )  # fmt: skip
    finally:
        del PROVIDERS["broken"]
    statuses = {row["provider"]: row["status"] for row in result.rows}
    assert statuses == {"broken": "error: TypeError: this provider is broken", "frozen": "ok"}
    assert [row["provider"] for row in result.failed] == ["broken"]
    assert any("broken failed" in m for m in messages)


@pytest.mark.parametrize("provider", ["smoa-triton", "smoa-triton-mw", "smoa-triton-fused", "smoa-triton-blocked"])
def test_triton_providers_are_wired_right_under_the_interpreter(monkeypatch, tiny_inputs, provider):
    """The CUDA-only rows cannot be timed here, but their wiring (backend choice, the merged_weight fast path) is
    checked against the oracle with the Triton interpreter on the CPU."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from smoa.backends import available_backends

    if not available_backends()["triton"][0]:
        pytest.skip(available_backends()["triton"][1])
    error, saved = build_case(provider, tiny_inputs, r=4, num_blocks=2).check()
    assert error <= 1e-5 and saved is not None


def test_progress_in_a_log_is_a_few_lines_and_on_a_terminal_the_live_bar():
    import io

    from smoa.bench.progress import progress_bar

    lines = []
    bar = progress_bar(200, True, io.StringIO(), lines.append)  # a log: not a terminal
    for _ in range(200):
        bar.update(1)
    bar.close()
    assert len(lines) == 4 and lines[-1].startswith("smoa bench: 200/200")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    live = progress_bar(10, True, screen, lines.append)
    live.update(10)
    live.close()
    assert "\r" in screen.getvalue() and len(lines) == 4  # tqdm's bar, no log lines
    quiet = []
    off = progress_bar(10, False, io.StringIO(), quiet.append)
    off.update(10)
    off.close()
    assert quiet == []
