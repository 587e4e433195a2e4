"""How `make test` shares the suite between its two workers (--dist loadgroup): hooks that tests/conftest.py
takes in.

Each xdist_group runs whole on one worker. A test without an `xdist_group` mark is in its file's group, so that its
module's fixtures are built once, as under --dist loadfile. A file whose tests are long and independent (a chain
of launches each, or a fixture of their own) gives them groups of their own: those go first, so that the workers
start on the longest work and share it, and the files' groups follow in their order to fill the gaps.

pytest-xdist 3.8 tells its scheduler a test's group by rewriting the test's node id, which pytest 9.2's node ids
ignore: every test would be scheduled alone, silently. So each worker writes its tests' groups to a file that the
scheduler here reads (it still reads xdist's own way too, where that works).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

GROUPS_DIR = "cola_xdist_groups"  # the workers' input that names the directory of their group files
GROUPS_KEY = pytest.StashKey[Path]()


def group_of(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: group_of(item) == item.path.stem)  # stable: each file's own order is kept


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and config.getoption("dist", "no") == "loadgroup":
        config.stash[GROUPS_KEY] = Path(tempfile.mkdtemp(prefix="cola-xdist-groups-"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if GROUPS_KEY in config.stash:
        shutil.rmtree(config.stash[GROUPS_KEY], ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:  # xdist's WorkerController
    if GROUPS_KEY in node.config.stash:
        node.workerinput[GROUPS_DIR] = str(node.config.stash[GROUPS_KEY])


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook tells the scheduler that this worker has collected
def pytest_collection_finish(session: pytest.Session) -> None:
    workerinput = getattr(session.config, "workerinput", {})
    if GROUPS_DIR in workerinput:  # the node ids as this worker reports them to the scheduler
        groups = {item.nodeid: group_of(item) for item in session.items}
        path = Path(workerinput[GROUPS_DIR]) / f"{workerinput['workerid']}.json"
        # Whole or not at all: the scheduler once read a file still being written (JSONDecodeError).
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(groups), encoding="utf-8")
        partial.replace(path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:  # xdist's Producer and Scheduling
    if GROUPS_KEY not in config.stash:
        return None
    from xdist.scheduler import LoadGroupScheduling

    groups_dir, groups = config.stash[GROUPS_KEY], {}

    class FileGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if not groups:  # every worker has collected (and written its file) before the first call
                for path in groups_dir.glob("*.json"):
                    groups.update(json.loads(path.read_text(encoding="utf-8")))
            return groups.get(nodeid) or super()._split_scope(nodeid)

    return FileGroupScheduling(config, log)
