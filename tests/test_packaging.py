"""How the package resolves once installed: the repository's top-level ``kernels/`` folder must
never hide another distribution's ``kernels`` package, and ``rlgaf_fast.kernels`` must always be
ours. Both are checked in a subprocess started from the repository root, where Python puts that
root first on ``sys.path`` (as ``python -m pytest`` and ``python script.py`` do there)."""

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
import rlgaf_fast.kernels.launch as launch
print(json.dumps({
    "kernels_origin": None if spec is None else spec.origin,
    "kernels_locations": None if spec is None else list(spec.submodule_search_locations or []),
    "ours": launch.__file__,
}))
"""


@functools.cache
def _probe() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _installed_kernels_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = next(f for f in dist.files if str(f).replace("\\", "/") == "kernels/__init__.py")
    return Path(dist.locate_file(init)).resolve().parent


def test_import_kernels_from_the_root_is_never_ours():
    found = _probe()
    installed = _installed_kernels_dir()
    if installed is not None:
        # A regular package anywhere on the path outranks a namespace portion.
        assert found["kernels_origin"] is not None
        assert Path(found["kernels_origin"]).resolve().parent == installed
    else:
        # Without another distribution, our folder may only ever be a namespace portion.
        assert found["kernels_origin"] in (None, "namespace")
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_rlgaf_fast_kernels_is_ours():
    ours = Path(_probe()["ours"])
    assert ours.name == "launch.py"
    assert ours.parent.name == "kernels"
    # Editable installs and source checkouts read the repository's folder; a regular install
    # reads its own copy inside the installed package.
    assert ours.parent.parent.name == "rlgaf_fast"
    if ours.resolve().is_relative_to(ROOT):
        assert ours.resolve().parent == ROOT / "kernels"
