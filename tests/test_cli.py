"""The ``smoa`` console script and ``python -m experiments``: fast help (nothing heavy imported), one-line errors with
exit status 2, outputs in a git-ignored place, and the registration list that tolerates absent modules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smoa.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: smoa" in out and "info" in out and "bench" in out


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "triton" in out


def test_info_full_checks_the_backends_themselves(capsys):
    import smoa

    assert main(["info", "--full"]) == 0
    out = capsys.readouterr().out
    for name, (ok, _) in smoa.available_backends().items():
        assert any(line.split()[:2] == [name, "available" if ok else "unavailable:"] for line in out.splitlines())


def test_help_and_info_import_neither_torch_nor_peft():
    code = (
        "import sys, contextlib, io\n"
        "from smoa.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main([]); main(['info'])\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr


def test_import_smoa_is_light_and_still_registers_with_peft_in_either_order():
    light = "import sys, smoa; assert 'torch' not in sys.modules and 'peft' not in sys.modules"
    assert _run("-c", light).returncode == 0
    for code in (
        "import smoa\nfrom peft.utils import PeftType\nfrom peft import PEFT_TYPE_TO_CONFIG_MAPPING as M\n",
        "from peft.utils import PeftType\nimport smoa\nfrom peft import PEFT_TYPE_TO_CONFIG_MAPPING as M\n",
    ):
        code += "from smoa.peft import SMoAConfig\nassert M[PeftType.SMOA] is SMoAConfig\n"
        result = _run("-c", code)
        assert result.returncode == 0, result.stderr


def test_console_entry_point_runs():
    result = _run("-m", "smoa.cli", "--help")
    assert result.returncode == 0 and "usage: smoa" in result.stdout


def test_absent_subcommand_modules_are_left_out():
    parser = build_parser(("smoa.bench.command", "smoa.no_such_module", "no_such_package.command"))
    assert parser.parse_args(["bench"]).command == "bench"
    with pytest.raises(SystemExit):
        parser.parse_args(["no_such_module"])


def _one_line_error(main_function, argv, capsys) -> str:
    """Run ``main_function(argv)``; assert exit status 2 and exactly one line on stderr; return it."""
    try:
        status = main_function(argv)
    except SystemExit as exit_info:  # argparse's usage errors exit
        status = exit_info.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, (argv, status, err)
    return lines[0]


@pytest.mark.parametrize(
    "argv, names",
    [
        (["nope"], "nope"),  # unknown command
        (["info", "--bogus"], "--bogus"),  # unknown option of a light command
        (["bench", "--shapes", "3"], "--shapes"),  # a bad value, parsed by the real bench parser
        (["bench", "--device", "cpu", "--rank", "4", "--blocks", "99", "--shapes", "8x8"], "K=99"),  # invalid config
        (["bench", "--providers", "nope"], "nope"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, names, capsys):
    assert names in _one_line_error(main, argv, capsys)


def test_experiments_bad_files_give_one_line_and_status_2(tmp_path, capsys):
    from experiments.__main__ import main as experiments_main

    not_json = tmp_path / "broken.json"
    not_json.write_text("{not json")
    wrong_shape = tmp_path / "list.json"
    wrong_shape.write_text(json.dumps([1, 2]))
    for argv, names in (
        (["rank", str(tmp_path / "missing.json")], "missing.json"),
        (["rank", str(not_json)], "broken.json"),
        (["rank", str(wrong_shape)], "list.json"),
        (["finetune", "--lr", "-1"], "lr=-1"),  # refused before the model loads
        (["finetune", "--num-blocks", "0"], "num_blocks=0"),
        (["study", "--bogus"], "--bogus"),
    ):
        assert names in _one_line_error(experiments_main, argv, capsys)


def test_experiments_run_from_the_repository():
    result = _run("-m", "experiments", "--help")
    assert result.returncode == 0 and all(name in result.stdout for name in ("finetune", "study", "rank"))


def test_default_outputs_are_git_ignored_and_not_committed_results():
    from experiments.study import FULL_DEFAULTS, QUICK_DEFAULTS
    from smoa.bench.run import BenchConfig

    defaults = [BenchConfig().output_dir, FULL_DEFAULTS["out"], QUICK_DEFAULTS["out"]]
    rank = build_parser(("experiments.rank",), prog="x").parse_args(["rank", "s.json"])
    defaults.append(rank.out)
    for path in defaults:
        assert Path(path).parts[0] == "smoa-results", path
    ignored = _run("-c", "import subprocess; print(subprocess.run(['git', 'check-ignore', 'smoa-results/bench/x.csv']"
                   ", capture_output=True, text=True).stdout)")  # fmt: skip
    assert "smoa-results/bench/x.csv" in ignored.stdout


def test_default_bench_providers_on_cpu_are_only_the_runnable_ones():
    import torch

    from smoa.bench.run import PROVIDERS, BenchConfig

    providers = BenchConfig(device="cpu").resolve().providers
    cpu = torch.device("cpu")
    assert providers == tuple(name for name, p in PROVIDERS.items() if p.unavailable(cpu) is None)
    assert "smoa-triton" not in providers and "smoa-torch" in providers and "frozen" in providers


def test_the_product_does_not_depend_on_the_research_harness():
    import ast

    for path in [*(ROOT / "smoa").rglob("*.py"), *(ROOT / "smoa_kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not any(name.split(".")[0] == "experiments" for name in names), path
    assert 'include = ["smoa*", "smoa_kernels*"]' in (ROOT / "pyproject.toml").read_text()  # experiments/ not installed
