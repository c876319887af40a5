"""The ``smoa`` console script."""

import subprocess
import sys

from smoa.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: smoa" in out and "info" in out


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "triton" in out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "smoa.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: smoa" in result.stdout
