#!/usr/bin/env bash
# docs/cluster.md's install on a node without network, proven on this machine: a wheelhouse made by
# experiments/offline/make_wheelhouse.sh for this machine's Python and platform, installed with --no-index into a
# fresh virtualenv whose "site" already provides torch, transformers and accelerate (those of $SITE_VENV, linked
# in through a .pth file rather than copied: torch is GBs), with the network cut (a network namespace of its own
# when this runs as root; else no index, no config, and a proxy that goes nowhere). The site's torch must be
# kept, not replaced, and the installed package must import and start.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE_VENV=${SITE_VENV:-.venv}
work=$(mktemp -d -t cola-offline-XXXXXX)
trap 'rm -rf "$work"' EXIT
site_python="$SITE_VENV/bin/python"

node_python=$("$site_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
node_platforms=$("$site_python" -c 'from packaging.tags import sys_tags
print(*dict.fromkeys(t.platform for t in sys_tags()))')
NODE_PYTHON=$node_python NODE_PLATFORMS=$node_platforms PYTHON="$site_python" \
  experiments/offline/make_wheelhouse.sh "$work/wheelhouse"
if ls "$work/wheelhouse" | grep -Eiq '^(torch|transformers|accelerate)-'; then
  echo "offline_install: the wheelhouse holds the site's packages" >&2
  exit 1
fi

# The site: torch, transformers, accelerate and everything they need, as installed in $SITE_VENV.
mkdir "$work/site"
"$site_python" - "$work/site" <<'PYTHON'
import os
import re
import sys
from importlib import metadata
from pathlib import Path

site = Path(sys.argv[1])
wanted, seen = ["torch", "transformers", "accelerate"], set()
while wanted:
    name = re.sub(r"[-_.]+", "-", wanted.pop()).lower()
    if name in seen:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue  # an optional or platform-specific requirement not installed here
    seen.add(name)
    for requirement in dist.requires or []:
        if "extra ==" not in requirement:
            wanted.append(re.match(r"[A-Za-z0-9_.-]+", requirement)[0])
    root = Path(dist.locate_file(""))
    for top in {Path(str(file)).parts[0] for file in dist.files or []}:
        if top not in ("..", "__pycache__", "bin") and not (site / top).exists() and (root / top).exists():
            os.symlink(root / top, site / top)
PYTHON
base_python=$("$site_python" -c 'import sys; print(sys._base_executable)')
"$base_python" -m venv "$work/node"
node_site=$("$work/node/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$work/site" >"$node_site/site_provided.pth"
# Python 3.11's venv bundles an old setuptools that would shadow the site's (torch requires a recent one).
"$work/node/bin/python" -m pip uninstall --quiet --yes setuptools 2>/dev/null || true

offline=(env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_INDEX_URL=http://127.0.0.1:9/ PIP_EXTRA_INDEX_URL=
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= HF_HUB_OFFLINE=1)
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  offline=(unshare -n "${offline[@]}")
fi
"${offline[@]}" "$work/node/bin/python" -m pip install --quiet --no-index --find-links "$work/wheelhouse" cola-hf
"${offline[@]}" "$work/node/bin/python" - "$work/site" <<'PYTHON'
import sys
from pathlib import Path

import accelerate
import torch
import transformers

import cola_hf.cli.train  # every layer of the package, and its dependencies

for module in (torch, transformers, accelerate):
    assert Path(module.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()) or str(
        Path(module.__file__)
    ).startswith(sys.argv[1]), f"{module.__name__} was installed again: {module.__file__}"
PYTHON
"${offline[@]}" "$work/node/bin/cola-train" --help >/dev/null
echo "offline_install: installed from $(ls "$work/wheelhouse"/*.whl | wc -l) wheels without network, the site's torch kept" >&2
