"""`make test`'s scheduling (tests/xdist_groups.py): a file's unmarked tests stay on one worker (their module's
fixtures are built once), a group of its own stays on one worker wherever its tests are, and such groups start
first. Run on a throwaway suite of instant tests, by pytest under xdist as `make test` runs it."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from launching import REPO, offline_env

CONFTEST = """
from xdist_groups import (  # noqa: F401
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_configure_node,
    pytest_itemcollected,
    pytest_unconfigure,
    pytest_xdist_make_scheduler,
)
"""

RECORD = """
import os, pytest

def record(request):
    with open(os.environ["RAN_LOG"], "a") as log:
        log.write(f"{os.environ['PYTEST_XDIST_WORKER']} {request.node.name}\\n")
"""


def test_groups_stay_on_one_worker_and_groups_of_their_own_go_first(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST, encoding="utf-8")
    tests = {
        # Unmarked files, as another engineer adds them: one group each.
        "test_a_file.py": [f"def test_first_{n}(request):\n    record(request)\n" for n in range(4)],
        "test_b_file.py": [f"def test_second_{n}(request):\n    record(request)\n" for n in range(4)],
        # A chain split over the last two files, after an unmarked test: one group of its own, started first.
        "test_c_file.py": [
            "def test_third_unmarked(request):\n    record(request)\n",
            '@pytest.mark.xdist_group("chain")\ndef test_chain_0(request):\n    record(request)\n',
        ],
        "test_d_file.py": ['@pytest.mark.xdist_group("chain")\ndef test_chain_1(request):\n    record(request)\n'],
    }
    for name, functions in tests.items():
        (suite / name).write_text(RECORD + "\n\n".join(functions), encoding="utf-8")
    log = tmp_path / "ran.log"
    env = offline_env({"RAN_LOG": str(log)})
    env["PYTHONPATH"] = f"{Path(__file__).parent}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder"]
        + ["-p", "no:cacheprovider", "-q", str(suite)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ran = [line.split() for line in log.read_text().splitlines()]
    assert len(ran) == 11
    workers = defaultdict(set)
    for worker, name in ran:
        workers[name.rsplit("_", 1)[0]].add(worker)
    assert {group: len(on) for group, on in workers.items()} == {
        "test_first": 1, "test_second": 1, "test_third": 1, "test_chain": 1
    }  # fmt: skip
    (chain_worker,) = workers["test_chain"]
    first_two = [name for worker, name in ran if worker == chain_worker][:2]
    assert sorted(first_two) == ["test_chain_0", "test_chain_1"], ran
