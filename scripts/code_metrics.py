"""Size and coupling figures of the code base, for a redesign's before/after:

    python scripts/code_metrics.py            # spacy_llmner/, benchmarks/, scripts/, tests/

- the largest class and module of the package (lines), the number of its modules;
- ``getattr``/``hasattr`` feature probes: calls with a literal attribute name (a dynamic name is not a probe);
- private-member uses outside their module: ``x._name`` where ``x`` is not ``self``/``cls``, and
  ``from m import _name``, in any file (dunders, ``doc._.ext`` and namedtuple's ``_fields_`` excepted).
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_uses(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr in ("_", "_fields_"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield node.lineno, f"from {node.module} import {alias.name}"


def probes(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                yield node.lineno, ast.unparse(node)


def main():
    dirs = sys.argv[1:] or ["spacy_llmner", "benchmarks", "scripts", "tests"]
    package = sorted((ROOT / "spacy_llmner").rglob("*.py"))
    sizes = {p: len(p.read_text().splitlines()) for p in package}
    classes = []
    for p in package:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(ROOT)}:{node.name}"))
    biggest = max(sizes, key=sizes.get)
    print(f"package modules: {len(package)}")
    print(f"largest module: {biggest.relative_to(ROOT)} ({sizes[biggest]} lines)")
    print(f"largest class: {max(classes)[1]} ({max(classes)[0]} lines)")
    n_probe = n_private = 0
    for d in dirs:
        for p in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(p.read_text())
            for line, text in probes(tree):
                n_probe += 1
                print(f"  probe   {p.relative_to(ROOT)}:{line}: {text}")
            for line, text in private_uses(tree):
                n_private += 1
                print(f"  private {p.relative_to(ROOT)}:{line}: {text}")
    print(f"getattr/hasattr probes: {n_probe}")
    print(f"private-member uses outside their module: {n_private}")


if __name__ == "__main__":
    main()
