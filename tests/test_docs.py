"""The front page and its translations say the same thing where it can be checked: the commands, the figures, the
structure, the links and where the notebook lives.

"Command for command" compares what a reader would run, not how it is written: fenced blocks tagged bash/sh/shell
are compared command by command as the shell splits them (`shlex`, comments dropped, `\\` continuations joined);
python blocks by their syntax tree (comments and layout dropped). So a translated comment passes and a changed
flag, value or command fails. Untagged blocks (the layout figure) keep their first column, the paths; the rest of
each entry is prose and may be translated. In tables, the numbers must be the same, in the same order.
"""

from __future__ import annotations

import ast
import configparser
import difflib
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
TRANSLATIONS = sorted((REPO / "i18n").glob("README_*.md"))
NOTEBOOK = "notebooks/cola_tutorial.ipynb"
SHELL = ("bash", "sh", "shell")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
NUMBER = re.compile(r"\d+\.\d+")


def code_blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """Each fenced block as (language, what must match), in order."""
    blocks = []
    for language, body in FENCE.findall(markdown):
        if language in SHELL:
            blocks.append((language, shell_commands(body)))
        elif language == "python":
            blocks.append((language, [ast.dump(ast.parse(body))]))
        else:
            # A figure such as the layout: the first column of each entry (its continuation lines are indented).
            blocks.append((language, [line.split()[0] for line in body.splitlines() if line[:1].strip()]))
    return blocks


def shell_commands(script: str) -> list[str]:
    """One entry per command: its words as the shell splits them, comments dropped, continuations joined."""
    commands, pending = [], ""
    for line in script.splitlines():
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            commands.append(shlex.join(words))
    return commands


def table_numbers(markdown: str) -> list[str]:
    return [number for line in markdown.splitlines() if line.startswith("|") for number in NUMBER.findall(line)]


def heading_levels(markdown: str) -> list[int]:
    outside_code = FENCE.sub("", markdown)
    return [len(match) for match in re.findall(r"^(#+) ", outside_code, re.MULTILINE)]


def differences(original: str, translation: str) -> list[str]:
    """What a translation gets wrong against the original; empty when its commands, figures and sections agree."""
    problems = []
    ours, theirs = code_blocks(original), code_blocks(translation)
    if len(ours) != len(theirs):
        problems.append(f"{len(theirs)} code blocks, the original has {len(ours)}")
    for number, (mine, other) in enumerate(zip(ours, theirs, strict=False), start=1):
        if mine != other:
            diff = difflib.unified_diff(
                mine[1], other[1], f"original ({mine[0]})", f"translation ({other[0]})", lineterm=""
            )
            problems.append(f"code block {number} differs:\n" + "\n".join(diff))
    if table_numbers(original) != table_numbers(translation):
        problems.append(f"table figures differ: {table_numbers(original)} vs {table_numbers(translation)}")
    if heading_levels(original) != heading_levels(translation):
        problems.append(f"sections differ: heading levels {heading_levels(original)} vs {heading_levels(translation)}")
    return problems


def test_there_is_a_chinese_front_page():
    assert REPO / "i18n" / "README_zh-hans.md" in TRANSLATIONS


@pytest.mark.parametrize("translation", TRANSLATIONS, ids=lambda path: path.name)
def test_translation_matches_the_readme(translation):
    problems = differences(README.read_text(encoding="utf-8"), translation.read_text(encoding="utf-8"))
    assert not problems, f"{translation.name} is out of step with README.md:\n" + "\n".join(problems)


def test_a_changed_flag_fails_and_a_translated_comment_passes():
    readme = README.read_text(encoding="utf-8")
    assert "--num_train_epochs 2" in readme and "# the tutorial's recipe" in readme
    assert not differences(readme, readme.replace("# the tutorial's recipe", "# 教程的配方"))
    changed = differences(readme, readme.replace("--num_train_epochs 2", "--num_train_epochs 3", 1))
    assert len(changed) == 1 and "--num_train_epochs 3" in changed[0]
    assert differences(readme, readme.replace("num_train_epochs=2", "num_train_epochs=3"))  # the python block
    figure = re.search(r"\d\.\d{3} \+- \d\.\d{3}", readme).group()  # the results table's first figure
    assert differences(readme, readme.replace(figure, figure.replace(" +- ", "1 +- ")))  # a changed figure
    assert differences(readme, readme.replace("\n## Tests\n", "\n"))  # a section


def test_continued_lines_are_one_command():
    assert shell_commands("run \\\n    --a 1 \\\n    --b 2   # note\nnext") == ["run --a 1 --b 2", "next"]


@pytest.mark.parametrize("page", [README, *TRANSLATIONS], ids=lambda path: path.name)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    targets = [link.split("#")[0] for link in LINK.findall(text) if "://" not in link and not link.startswith("#")]
    assert targets
    missing = [target for target in targets if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def top_of(page: Path) -> str:
    return "\n".join(page.read_text(encoding="utf-8").splitlines()[:4])


def test_language_switch_links_both_ways():
    assert "English | [简体中文](i18n/README_zh-hans.md)" in top_of(README)
    for translation in TRANSLATIONS:
        assert "[English](../README.md)" in top_of(translation)


def test_colab_badge_opens_the_notebook_at_the_repository_home():
    """The badge, the notebook's install cell and setup.cfg's url name one repository; the badge's path exists."""
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "setup.cfg")
    home = metadata["metadata"]["url"]
    owner_and_name = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", home).group(1)
    colab = f"https://colab.research.google.com/github/{owner_and_name}/blob/main/{NOTEBOOK}"
    for page in [README, *TRANSLATIONS]:
        assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab})" in (
            page.read_text(encoding="utf-8")
        ), page.name
    assert (REPO / NOTEBOOK).is_file()
    cells = {cell["id"]: "".join(cell["source"]) for cell in json.loads((REPO / NOTEBOOK).read_text())["cells"]}
    assert f"cola-hf @ git+{home}" in cells["install"]
    assert colab in cells["intro"]
