#!/usr/bin/env bash
# A wheelhouse for a GPU node without network: made here (a machine with network), for the NODE's Python and
# platforms, without what the node's site already provides (its CUDA build of torch, and usually transformers and
# accelerate). Then, on the node: python -m pip install --no-index --find-links WHEELHOUSE cola-hf
# (docs/cluster.md, "Installing on a node without network").
#
#   NODE_PYTHON=3.11 NODE_PLATFORMS="$(cat node_platforms.txt)" experiments/offline/make_wheelhouse.sh WHEELHOUSE
#
# NODE_PYTHON    the node's `python -c 'import sys; print("%d.%d" % sys.version_info[:2])'`
# NODE_PLATFORMS every platform tag the node's Python installs, as the node prints them:
#                python -c 'from packaging.tags import sys_tags; print(*dict.fromkeys(t.platform for t in sys_tags()))'
#                (all of them: pip download takes a manylinux_2_28 tag literally, not as "2_28 or older")
# SITE          what the node's site provides and the wheelhouse leaves out (default: torch transformers
#               accelerate); pip on the node keeps them when their versions are within setup.cfg's ranges.
# PYTHON        the Python that runs pip here (any version: pip downloads for NODE_PYTHON).
set -euo pipefail
wheelhouse=${1:?usage: make_wheelhouse.sh WHEELHOUSE (with NODE_PYTHON and NODE_PLATFORMS set)}
: "${NODE_PYTHON:?make_wheelhouse: set NODE_PYTHON to the Python version of the node, e.g. 3.11}"
: "${NODE_PLATFORMS:?make_wheelhouse: set NODE_PLATFORMS to the platform tags the node prints, see above}"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-torch transformers accelerate}
repo="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$wheelhouse"

# The package itself: a pure-Python wheel, built here.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheelhouse" "$repo"
# Its requirements but the site's (setup.cfg's install_requires, ranges as declared).
"$PYTHON" - "$repo/setup.cfg" $SITE >"$wheelhouse/requirements.txt" <<'PYTHON'
import configparser
import re
import sys

config = configparser.ConfigParser()
config.read(sys.argv[1])
site = {name.lower().replace("_", "-") for name in sys.argv[2:]}
for line in config["options"]["install_requires"].split("\n"):
    requirement = line.split("#")[0].strip()
    if requirement and re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower().replace("_", "-") not in site:
        print(requirement)
PYTHON
# Wheels only (the node builds nothing), for the node's interpreter and platform.
platforms=()
for platform in $NODE_PLATFORMS; do
  platforms+=(--platform "$platform")
done
"$PYTHON" -m pip download --quiet --dest "$wheelhouse" --only-binary=:all: --implementation cp \
  --python-version "$NODE_PYTHON" "${platforms[@]}" --requirement "$wheelhouse/requirements.txt"
# A dependency that itself needs torch (captum) makes pip fetch torch and its CUDA runtime too: the node has
# them (the site's), so they leave the wheelhouse, and pip takes the site's when it installs.
for name in $SITE nvidia triton; do
  rm -f "$wheelhouse/${name}"-*.whl "$wheelhouse/${name}"_*.whl
done
echo "make_wheelhouse: $(ls "$wheelhouse"/*.whl | wc -l) wheels in $wheelhouse for Python $NODE_PYTHON" >&2
