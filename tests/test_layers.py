"""The layering in docs/design.md, checked on the source: no module imports a layer above its own (lazy imports
inside functions count too). A module may import its own layer and the ones below."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tunewise"

# lowest first; a module belongs to the longest entry that prefixes its dotted name
LAYERS = [
    ("errors", "util", "metrics"),  # leaves: no tunewise imports but each other
    ("config", "report", "tracking", "openai_job", "results"),  # the config schema; reports render dicts into HTML; trackers; job import; typed stage results
    ("models", "data", "registry"),  # loading models and tokenizers; data preparation; the registry database
    ("engine",),  # generation
    ("rag",),  # knowledge base, retrieval, RAG prompts, RAFT and synthetic data
    ("train", "eval", "advise"),  # the stages
    ("gate", "serve", "tune", "monitor"),  # what judges and serves trained models; the search over runs; production vs training
    ("pipeline", "retrain"),  # the workflows over the stages
    ("cli", "__main__", "ui"),  # the command line and the web dashboard
]


def layer_of(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"tunewise.{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return best[0]


def imports(path: Path) -> set[str]:
    """The tunewise modules a file imports (relative imports resolved), without the 'tunewise.' prefix."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; for __init__.py the package itself
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n.removeprefix("tunewise.") for n in names if n.startswith("tunewise.")}
    return out


def test_no_module_imports_a_layer_above_it():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if mod == "__init__":
            continue
        own = layer_of(mod)
        for target in sorted(imports(path)):
            if layer_of(target) > own:
                problems.append(f"{mod} (layer {own}) imports {target} (layer {layer_of(target)})")
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: a relative import from a lower layer to a higher one is found."""
    p = ROOT / "data" / "records.py"
    assert "data.records" not in imports(p)  # it does not import itself
    assert layer_of("data.records") < layer_of("eval.evaluate") and layer_of("rag.answer") > layer_of("data.prepare")
    probe = ROOT / "data" / "_probe_layers.py"
    try:
        probe.write_text("def f():\n    from ..eval.evaluate import evaluate\n")
        assert "eval.evaluate" in imports(probe)
    finally:
        probe.unlink()


def import_graph() -> dict[str, set[str]]:
    """Module -> the tunewise modules it imports (lazy imports inside functions included; `from .x import name` counts as
    importing x)."""
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in sorted(ROOT.rglob("*.py"))}
    graph = {}
    for m, p in mods.items():
        deps = set()
        for n in imports(p):
            while n and n not in mods:  # a name imported from a module: that module
                n = n.rpartition(".")[0]
            if n and n != m:
                deps.add(n)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_between_modules():
    graph = import_graph()
    assert not cycles(graph), "import cycles (lazy imports count): " + "; ".join(" <-> ".join(c) for c in cycles(graph))
    # the check itself: one added import back is a cycle it reports
    graph["data.records"] = graph["data.records"] | {"data.formats"}
    assert any({"data.formats", "data.records"} <= set(c) for c in cycles(graph))


MAX_FUNCTION_LINES = 80  # docs/design.md: a function that needs more says why there (none does today)


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over the limit (split them, or say why in docs/design.md and here):\n" + "\n".join(long)
