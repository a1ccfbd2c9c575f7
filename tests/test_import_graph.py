"""The package's import graph has no cycles, counting the imports inside functions.

A cycle hidden behind a function-local import still ties two layers together (issue 22:
``arviz_io`` <-> ``mcmc`` <-> ``predictive`` and ``state_space`` -> ``models.rbf`` ->
``models._linear_family`` -> ``state_space`` were such cycles). Imports under ``if
TYPE_CHECKING:`` are annotations only and do not count.
"""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ppl_dyn")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(PKG))
                name = rel[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return mods


def _is_type_checking(node):
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path, mods):
    """(target module, function-local?) for every ppl_dyn import in the file."""
    out = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, local)
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("ppl_dyn"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    out.append((sub if sub in mods else child.module, inner))
            elif isinstance(child, ast.Import):
                out.extend((a.name, inner) for a in child.names if a.name.startswith("ppl_dyn"))
            visit(child, inner)

    visit(ast.parse(open(path).read()), False)
    return out


def _cycles(edges, nodes):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles_even_through_function_local_imports():
    mods = _modules()
    edges = {m: {t for t, _ in _imports(p, mods) if t in mods and t != m} for m, p in mods.items()}
    assert _cycles(edges, sorted(mods)) == []


def test_function_local_imports_do_not_grow():
    # a ratchet on the imported names inside functions: 152 before the cycles were
    # broken, 127 after (most keep JAX and ArviZ out of `import ppl_dyn` and the
    # command line's start fast), 121 in session 12; lower it as they go
    mods = _modules()
    local = sum(loc for p in mods.values() for _, loc in _imports(p, mods))
    assert local <= 121, local
