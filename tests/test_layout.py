"""The layering of the code: imports run one way, from the entry points down to the ground floor.

    floor 0  cli, diffusion, common                    (the error path, the maths, shared blocks, run utilities)
    floor 1  landmarks, clips, audio, metrics, fid     (dense landmarks, the clip format, speech in, measures)
    floor 2  vae, a2l, l2i, synth_*, adapt             (the stages, the synthetic data source, per-photo tuning)
    floor 3  dreamhead                                 (the cascade)
    floor 4  train, sample, evaluate, bench, data,     (entry points: nothing imports them)
             prepare

Every import of a project module, wherever it sits in the file, must go to a lower floor or stay on its own
floor without a cycle; entry points never import each other; no project import hides inside a function, except
that entry points may defer their heavy imports until their arguments are parsed (so --help answers at once).
"""
import ast
import glob
import os

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = {
    "cli": 0, "diffusion": 0, "common": 0,
    "landmarks": 1, "clips": 1, "audio": 1, "metrics": 1, "fid": 1, "augment": 1, "neutral": 1,
    "vae": 2, "a2l": 2, "l2i": 2, "synth_speech": 2, "synth_face": 2, "synth_clips": 2, "voices": 2, "adapt": 2,
    "dreamhead": 3,
    "train": 4, "sample": 4, "evaluate": 4, "bench": 4, "data": 4, "prepare": 4,
}
ENTRY_FLOOR = 4
MAX_LINES = 700


def modules() -> dict:
    return {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))}


def project_imports(path: str) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits inside a function) for every import in the file."""
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            found.extend((n, in_function) for n in names if n in FLOORS)
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_module_has_a_floor_and_a_docstring():
    for name, path in modules().items():
        assert name in FLOORS, f"{name}.py has no floor in tests/test_layout.py; give it one"
        assert ast.get_docstring(ast.parse(open(path).read())), f"{name}.py has no module docstring"


def test_imports_run_down_the_floors_without_circles():
    graph = {}
    for name, path in modules().items():
        graph[name] = set()
        for target, in_function in project_imports(path):
            assert not in_function or FLOORS[name] == ENTRY_FLOOR, f"{name}.py imports {target} inside a function"
            assert FLOORS[target] <= FLOORS[name], f"{name}.py (floor {FLOORS[name]}) imports {target} (floor " \
                                                   f"{FLOORS[target]}): imports must run down the floors"
            assert not (FLOORS[name] == FLOORS[target] == ENTRY_FLOOR), f"entry point {name}.py imports {target}.py"
            graph[name].add(target)
    assert not graph["diffusion"] and not graph["cli"], "the scheduler and the error path import nothing of ours"
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import circle: {' -> '.join(stack + [node, nxt])}"
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The checker itself can fail: an import inside a function and an upward import are both found."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""x"""\nimport landmarks\n\n\ndef f():\n    import dreamhead\n')
    assert project_imports(str(bad)) == [("landmarks", False), ("dreamhead", True)]


def test_no_module_is_over_700_lines():
    for name, path in modules().items():
        lines = sum(1 for _ in open(path))
        assert lines <= MAX_LINES, f"{name}.py has {lines} lines (at most {MAX_LINES}); split it along a seam"


@pytest.mark.parametrize("stage", ["vae", "a2l", "l2i"])
def test_every_train_flag_help_is_a_whole_sentence(stage):
    for action in train.build_parser(stage)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = action.help.split(" (default: ")[0]
        flag = action.option_strings[0]
        assert text[:1].isupper() and text.endswith(".") and len(text.split()) >= 3, \
            f"{stage} {flag}: --help should be a whole sentence, got {text!r}"
