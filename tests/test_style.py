"""The code read line by line and as a house (STYLE.md, rules 15 and 19), measured over the syntax
trees: lines of at most 100 characters (5% may run past, as nanoGPT's do), one name per assignment,
if/elif rather than a chained conditional expression, a loop rather than a comprehension with two
`for`s; the layers (video files under everything, the method, the worlds, the machinery, the
evaluation, the scripts) import only what lies below them; and budgets for what a learner reads,
not per file."""

import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a learner reads to learn Phenaki, and what a user runs
METHOD = ("transformer", "quantizer", "vqgan", "cvivit", "text_encoder", "maskgit", "data")
SCRIPTS = ("train", "sample", "evaluate", "serve", "bench")
# folders named for their layer, each behind a small door (its __init__.py)
LAYERS = ("media", "kit", "worlds", "evals")
# the one-screen budgets that stay per file; every other file is as long as its topic needs
BUDGETS = {"train.py": 450, "sample.py": 200}
# the reading path: the method and the three scripts of the README, as a whole
READING = METHOD + ("train", "sample", "evaluate")
READING_BUDGET = 2700


def modules() -> dict[str, str]:
    """Every module of the project (tests and docs aside): dotted name -> path."""
    paths = sorted(glob.glob(os.path.join(ROOT, "*.py")))
    for layer in LAYERS:
        paths += sorted(glob.glob(os.path.join(ROOT, layer, "*.py")))
    found = {}
    for path in paths:
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()
# the worlds' code is the key of every token cache built from them (stream.rendering_code): their
# lines change when what they render changes, not for a rule of layout
REFLOWED = {name: path for name, path in MODULES.items() if not name.startswith("worlds")}


def tree(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read())


def imports(name: str) -> set[str]:
    """The project modules that module `name` imports by name; a package's door counts as the
    package (`from worlds import WORLDS` imports worlds, `from worlds import animals` imports
    worlds.animals)."""
    found = set()
    for node in ast.walk(tree(MODULES[name])):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
            if len(submodules) < len(node.names):
                found.add(node.module)
            found |= submodules
    return found - {name}


def layer(name: str) -> str:
    """method, script, media, kit, worlds or evals (a door is its layer's)."""
    if name in METHOD:
        return "method"
    if name in SCRIPTS:
        return "script"
    return name.split(".")[0]


def test_at_most_5_percent_of_module_lines_run_past_100_characters():
    lines = []
    for path in MODULES.values():
        with open(path) as f:
            lines += f.read().splitlines()
    long = sum(len(line) > 100 for line in lines)
    assert long <= 0.05 * len(lines), f"{long} of {len(lines)} lines are over 100 characters"


def packed(node: ast.AST) -> bool:
    """a, b = x, y: two or more names bound from as many values on one line, unless the values are
    the same names in another order (a swap)."""
    if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Tuple):
        return False
    target = node.targets[0]
    if not isinstance(target, ast.Tuple) or len(target.elts) < 2:
        return False
    names = sorted(ast.dump(t, annotate_fields=False).replace("Store()", "") for t in target.elts)
    values = sorted(ast.dump(v, annotate_fields=False).replace("Load()", "") for v in node.value.elts)
    return names != values


def chained(node: ast.AST) -> bool:
    return isinstance(node, ast.IfExp) and isinstance(node.orelse, ast.IfExp)


def two_fors(node: ast.AST) -> bool:
    comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    return isinstance(node, comprehensions) and len(node.generators) > 1


@pytest.mark.parametrize("rule", [packed, chained, two_fors], ids=lambda rule: rule.__name__)
def test_no_module_packs_what_reads_better_on_lines_of_its_own(rule):
    found = []
    for name, path in REFLOWED.items():
        for node in ast.walk(tree(path)):
            if rule(node):
                found.append(f"{name}:{node.lineno}")
    assert not found, found


def test_the_packing_rule_tells_two_values_from_one_swap():
    def rule(line: str) -> bool:
        return packed(ast.parse(line).body[0])
    assert rule("prev, bird = start or spec.action, spec.species == 'bird'")
    assert rule("q, k = rotate(q, a), rotate(k, a)")
    assert not rule("a, b = b, a")
    assert not rule("q, k, v = qkv.split(D, dim=2)")


def test_each_layer_imports_only_what_lies_below_it():
    """media (video files and folders) imports nothing of ours; the method imports the method and
    media (data.py also the worlds' door: their clips are data); a world imports worlds and media;
    the machinery never imports a world, the evaluation or a script; the evaluation imports no
    script; a script imports no other script."""
    below = {"media": {"media"},
             "method": {"media", "method"},
             "worlds": {"media", "worlds"},
             "kit": {"media", "method", "kit"},
             "evals": {"media", "method", "worlds", "kit", "evals"},
             "script": {"media", "method", "worlds", "kit", "evals"}}
    wrong = []
    for name in MODULES:
        for target in imports(name):
            allowed = layer(target) in below[layer(name)]
            if name == "data" and target == "worlds":
                allowed = True
            if not allowed:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_sample_py_pulls_in_no_world_and_no_judge():
    """What `python sample.py` loads, read from a fresh interpreter: no world (their renderers and
    judges), and of the evaluation only the measures of --reconstruct."""
    code = "import sys, sample; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    ours = [m for m in loaded if m.split(".")[0] in LAYERS]
    assert not [m for m in ours if m.startswith("worlds")], ours
    assert [m for m in ours if m.startswith("evals.")] == ["evals.measures"], ours


def test_the_longest_import_chain_from_a_script_is_at_most_seven_files():
    """A door hands names on and adds no file to a chain: an import of it leads to the modules
    behind it. nanochat's longest chain is 7."""
    def behind(name: str) -> set[str]:
        targets = set()
        for target in imports(name):
            if target in LAYERS and not name.startswith(target):
                targets |= behind(target)
            else:
                targets.add(target)
        return targets

    def longest(name: str, path: tuple) -> tuple:
        best = path
        for target in behind(name) - set(path):
            chain = longest(target, path + (target,))
            if len(chain) > len(best):
                best = chain
        return best

    chains = [longest(script, (script,)) for script in SCRIPTS]
    assert max(len(chain) for chain in chains) <= 7, max(chains, key=len)


def test_the_top_level_holds_at_most_twelve_files_and_the_reading_path_fits_its_budget():
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert len(top) <= 12, top
    assert set(top) == {f"{name}.py" for name in METHOD + SCRIPTS}, top
    lines = 0
    for name in READING:
        with open(MODULES[name]) as f:
            lines += len(f.read().splitlines())
    assert lines <= READING_BUDGET, f"the reading path is {lines} lines, budget {READING_BUDGET}"


def test_train_py_and_sample_py_fit_their_budgets_and_each_training_loop_one_screen():
    over = []
    for name, budget in BUDGETS.items():
        with open(os.path.join(ROOT, name)) as f:
            count = len(f.read().splitlines())
        if count > budget:
            over.append(f"{name}: {count} lines, budget {budget}")
    assert not over, over
    # each stage's loop: the `with steps.guard` block, nanoGPT's loop is 77 lines with comments
    loops = {}
    for node in ast.walk(tree(MODULES["train"])):
        if isinstance(node, ast.With) and "guard" in ast.unparse(node.items[0].context_expr):
            loops[node.lineno] = node.end_lineno - node.lineno + 1
    assert len(loops) == 2 and max(loops.values()) <= 60, loops


def test_no_loss_is_called_by_a_string():
    """train.py calls each network's training forward, not a method named in a string."""
    for node in ast.walk(tree(MODULES["train"])):
        if isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            assert not (isinstance(first, ast.Constant) and first.value in ("loss", "generate", "predict")), \
                ast.unparse(node)
