#!/usr/bin/env bash
# The declared lower bounds are the tested ones: a second environment with every direct dependency of setup.cfg at
# its lower bound (other packages as pip resolves them), torch held at the local CPU build (its CUDA builds are
# several GB), runs the suite's `lowest` subset: a run end to end, resumes, a search, compare with significance.
# pip has no "lowest" resolution: the bounds become a constraints file of name==bound.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWEST_VENV:-.venv-lowest}"
torch="${TORCH:-torch==2.13.0}"

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$torch"
"$venv/bin/python" - setup.cfg >"$venv/lower-bounds.txt" <<'EOF'
"""name==bound for each of setup.cfg's install_requires but torch; a dependency without a lower bound fails."""
import configparser
import re
import sys

config = configparser.ConfigParser()
config.read(sys.argv[1])
for line in config["options"]["install_requires"].split("\n"):
    requirement = line.split("#")[0].strip()
    if not requirement:
        continue
    name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
    bound = re.search(r">=\s*([^,;\s]+)", requirement)
    if bound is None:
        sys.exit(f"setup.cfg: {requirement} has no lower bound (>=) to test")
    if name != "torch":
        print(f"{name}=={bound[1]}")
EOF
"$venv/bin/python" -m pip install --quiet --constraint "$venv/lower-bounds.txt" -e ".[dev]"
echo "lowest versions: $(tr '\n' ' ' <"$venv/lower-bounds.txt")with $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
# Only the files that hold `lowest` tests: pytest imports every file it collects, and the others may import what
# only the newest releases have.
mapfile -t files < <(grep -l "mark.lowest" tests/test_*.py)
OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -m lowest -p no:cacheprovider -q "${files[@]}"
