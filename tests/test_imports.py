"""The package has no import circles, and registers its operators in one place.

Edges are the ``import`` statements of every module of ``fusedloss`` (at module level and inside
functions alike, since a deferred import that closes a circle is still a circle); importing a
package's submodule counts as an edge to that submodule only (Python also runs the package's
``__init__``, as it does for any package).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fusedloss"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_circles():
    graph = import_graph()
    assert "fusedloss.pva.triton" in graph and "fusedloss.pva.fake" in graph["fusedloss.pva.triton"]
    assert not cycles(graph), f"import circles: {cycles(graph)}"


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_operators_are_registered_in_one_place():
    """The C++ operators' fakes are registered by fusedloss/core/registry.py for every family of
    FAMILIES, which imports the families by name; each Triton operator is defined (with its
    autograd) in its family's triton.py, which only its own family's functional.py imports."""
    calls = re.compile(r"register_fake\(|custom_op\(|triton_op\(|@triton_operator\(|register_terms_autograd\(")
    where = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if calls.search(p.read_text()))
    assert where == ["blendshape/triton.py", "core/autograd.py", "core/registry.py", "core/triton.py",
                     "pva/triton.py", "score/finite.py", "score/triton.py"]  # score/finite.py: finite_or_raise
    registry = (PACKAGE / "core" / "registry.py").read_text()
    assert 'FAMILIES = ("pva", "blendshape", "score")' in registry
    for name, targets in import_graph().items():
        for target in targets:
            if target.endswith(".triton") and target != "fusedloss.core.triton":
                assert name == target.rsplit(".", 1)[0] + ".functional", (name, target)


def test_import_loads_neither_dynamo_nor_triton():
    """``import fusedloss`` stays cheap: torch._dynamo (about a second) and Triton load only when a
    call needs them (torch.compile, the Triton backend)."""
    import subprocess
    import sys

    code = "import sys, fusedloss; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
