"""The mutation check's mutants still apply to the code: a refactor that moves a mutated line
must update its mutant, or the check would measure nothing."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "benchmarks" / "mutation_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_changes_exactly_one_place_of_existing_code():
    script = load_script()
    assert len({m.name for m in script.MUTANTS}) == len(script.MUTANTS)
    for m in script.MUTANTS:
        source = (ROOT / m.path).read_text()
        assert source.count(m.old) == 1, (m.name, m.path)
        assert m.old != m.new, m.name
        assert any((ROOT / t).is_file() for t in m.tests), m.name
