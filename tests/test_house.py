"""The layout of the house, drawn from the code itself: module-level imports form no circle, and the kernel package
never imports the user package (STYLE.md: smoa depends on smoa_kernels, never the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("smoa", "smoa_kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the two packages it imports at module level}`` (imports inside functions are lazy by
    intent and not edges; ``from package import module`` is an edge to the module)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for succ in sorted(graph[node]):
            if state.get(succ) == "open":
                cycles.append([*stack[stack.index(succ) :], succ])
            elif succ not in state:
                visit(succ)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def _is_parent_package_edge(a: str, b: str) -> bool:
    # a package's __init__ re-exporting from its own submodules is not a circle of ideas
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_module_level_imports_form_no_circle():
    graph = {a: {b for b in succ if not _is_parent_package_edge(a, b)} for a, succ in import_graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_kernel_package_never_imports_the_user_package():
    graph = import_graph()
    assert not [
        (a, b) for a, succ in graph.items() for b in succ if a.startswith("smoa_kernels") and b.split(".")[0] == "smoa"
    ]


def test_import_smoa_imports_neither_peft_nor_bitsandbytes():
    # bitsandbytes prints a multi-line notice at import on some CPUs; smoa imports it only when a 4-bit base is
    # adapted (smoa.peft.bnb uses the copy a bitsandbytes model already imported), never for `import smoa`
    import subprocess
    import sys

    code = "import sys, smoa; print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_no_code_or_doc_cites_a_work_item():
    # a reader of the code cannot follow a work-item number: the code says what it guarantees instead
    import re

    pattern = re.compile(r"\bissues? ?#?\d+\b|\bitem \d+ of\b", re.IGNORECASE)
    files = [p for d in ("smoa", "smoa_kernels", "tests", "tools", "docs", "benchmarks", "experiments")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md") and ".venv" not in p.parts]  # fmt: skip
    files.append(ROOT / "README.md")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert hits == [], hits


MAX_LINES = 600  # one idea a module: a file past this holds more than one


def test_no_module_of_the_two_packages_is_longer_than_max_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by idea: {long}"
