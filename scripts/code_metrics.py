"""Size and coupling figures of the code base, for a redesign's before/after:

    python scripts/code_metrics.py            # spacy_llmner/, benchmarks/, scripts/, tests/

- the largest class and module of the package (lines), the number of its modules;
- ``getattr``/``hasattr`` feature probes: calls with a literal attribute name (a dynamic name is not a probe);
- private-member uses outside their module: ``x._name`` where ``x`` is not ``self``/``cls``, and
  ``from m import _name``, in any file (dunders, ``doc._.ext`` and namedtuple's ``_fields_`` excepted);
- import cycles between the package's modules, lazy (function-level) imports included.

    python scripts/code_metrics.py --package /tmp/old/spacy_llmner   # another checkout's package (git archive)
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
            private_module = any(
                part.startswith("_") and not part.startswith("__") for part in (node.module or "").split(".")
            )
            if node.level == 0 and private_module and not (node.module or "").startswith("spacy_llmner"):
                yield node.lineno, f"from {node.module} import ..."
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield node.lineno, f"from {node.module} import {alias.name}"


def probes(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                yield node.lineno, ast.unparse(node)


def import_cycles(root: Path):
    """Strongly connected components (more than one module) of the package's import graph."""
    mods = {}
    for p in root.rglob("*.py"):
        parts = ("spacy_llmner",) + p.relative_to(root).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [mod, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[m].update(t for t in targets if t in mods and t != m)
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    args = sys.argv[1:]
    root = ROOT / "spacy_llmner"
    if args[:1] == ["--package"]:
        root, args = Path(args[1]), args[2:]
    dirs = args or ["spacy_llmner", "benchmarks", "scripts", "tests"]
    package = sorted(root.rglob("*.py"))
    sizes = {p: len(p.read_text().splitlines()) for p in package}
    classes = []
    for p in package:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root.parent)}:{node.name}"))
    biggest = max(sizes, key=sizes.get)
    print(f"package modules: {len(package)}")
    print(f"largest module: {biggest.relative_to(root.parent)} ({sizes[biggest]} lines)")
    print(f"largest class: {max(classes)[1]} ({max(classes)[0]} lines)")
    print(f"import cycles: {import_cycles(root) or 'none'}")
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
