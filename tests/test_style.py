"""The modules read line by line (STYLE.md, rules 15 and 19), measured over their syntax trees: lines of
at most 100 characters (5% may run past, as nanoGPT's do), one name per assignment, if/elif rather
than a chained conditional expression, a loop rather than a comprehension with two `for`s, and every
file within its line budget."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(glob.glob(os.path.join(ROOT, "*.py")))
BUDGETS = {"train.py": 450, "sample.py": 200, "data.py": 350}  # any other module: 450


def tree(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read())


def test_at_most_5_percent_of_module_lines_run_past_100_characters():
    lines = []
    for path in MODULES:
        with open(path) as f:
            lines += f.read().splitlines()
    long = sum(len(line) > 100 for line in lines)
    assert long <= 0.05 * len(lines), f"{long} of {len(lines)} lines are over 100 characters"


def packed(node: ast.AST) -> bool:
    """a, b, c = x, y, z: three or more names bound from as many independent values."""
    if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Tuple):
        return False
    target = node.targets[0]
    return isinstance(target, ast.Tuple) and len(target.elts) >= 3


def chained(node: ast.AST) -> bool:
    return isinstance(node, ast.IfExp) and isinstance(node.orelse, ast.IfExp)


def two_fors(node: ast.AST) -> bool:
    comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    return isinstance(node, comprehensions) and len(node.generators) > 1


@pytest.mark.parametrize("rule", [packed, chained, two_fors], ids=lambda rule: rule.__name__)
def test_no_module_packs_what_reads_better_on_lines_of_its_own(rule):
    found = []
    for path in MODULES:
        for node in ast.walk(tree(path)):
            if rule(node):
                found.append(f"{os.path.basename(path)}:{node.lineno}")
    assert not found, found


def test_every_module_fits_its_line_budget():
    over = []
    for path in MODULES:
        name = os.path.basename(path)
        with open(path) as f:
            count = len(f.read().splitlines())
        if count > BUDGETS.get(name, 450):
            over.append(f"{name}: {count} lines, budget {BUDGETS.get(name, 450)}")
    assert not over, over
