"""The package reads top-down: its import graph (module-level AND function-local imports) has no cycle.

A function-local import can hide a cycle from Python's import machinery but not from this test.
Layers, bottom to top: data/, losses, models, augment, sampling, parallel, evaluation, plots, files,
checkpoints -> train_step -> input_pipeline, embedding -> protocols -> train; inference, index and
commands use a trained model and never reach into training. On top: the entry points in
siamese_jax.cli (the installed `siamese-train`/`siamese-evaluate`), which `experiments/*` only wrap.
"""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    files = list((REPO / "siamese_jax").rglob("*.py")) + list((REPO / "experiments").glob("*.py"))
    return {_module_name(p): p for p in files}


def _resolve(name: str, modules) -> str:
    """The longest known module prefix of a dotted name (`siamese_jax.data.load` -> `siamese_jax.data`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] in ("siamese_jax", "experiments"):
                    dep = _resolve(t, modules)
                    if dep and dep != mod:
                        graph[mod].add(dep)
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "siamese_jax.train" in graph and "siamese_jax.input_pipeline" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_layers_import_down_only():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("siamese_jax"):
            assert not any(d.startswith("experiments") for d in deps), f"{mod} imports the experiments"
    # Evaluation does not know about the training loop; the loop calls the evaluation at its end.
    assert "siamese_jax.train" not in _reachable(graph, "siamese_jax.protocols")
    assert "siamese_jax.protocols" in graph["siamese_jax.train"]
    # Using a trained model never reaches the loop or the protocols.
    for user in ("siamese_jax.inference", "siamese_jax.index", "siamese_jax.commands"):
        below = _reachable(graph, user)
        assert not below & {"siamese_jax.train", "siamese_jax.protocols", "siamese_jax.input_pipeline"}, user
    # Data preparation and embedding sit below both the loop and the protocols.
    for low in ("siamese_jax.input_pipeline", "siamese_jax.embedding"):
        assert not _reachable(graph, low) & {"siamese_jax.train", "siamese_jax.protocols"}, low


def test_entry_points_sit_on_top():
    graph = import_graph()
    # Nothing in the library imports the command-line layer (it is the top; the library stays usable
    # from a notebook without absl flags being defined).
    for mod, deps in graph.items():
        if mod.startswith("siamese_jax") and not mod.startswith("siamese_jax.cli"):
            assert not any(d.startswith("siamese_jax.cli") for d in deps), f"{mod} imports the CLI"
    for cmd in ("train", "evaluate", "export"):
        assert "siamese_jax.cli" in graph[f"siamese_jax.cli.{cmd}"]
        # experiments/<cmd>.py is a shim over the installed entry point, not a second copy of it.
        assert graph[f"experiments.{cmd}"] == {f"siamese_jax.cli.{cmd}"}, graph[f"experiments.{cmd}"]
    # The configs ship in the package; experiments/configs/* re-export them.
    assert "siamese_jax.configs.default" in graph["siamese_jax.configs.omniglot_koch"]
