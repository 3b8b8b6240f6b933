"""Prints the commands of README.md's quick start, one per line (the first fenced bash block that
installs the package), so that CI runs exactly what a new user types."""

import re
from pathlib import Path

readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
quick = next((b for b in blocks if "pip install" in b), None)
if quick is None:
    raise SystemExit("README.md has no ```bash block with the pip install command")
commands = [line for line in quick.splitlines() if line.strip() and not line.startswith("#")]
if len(commands) != 2:
    raise SystemExit(f"README.md's quick start should have two commands, found {commands}")
print("\n".join(commands))
