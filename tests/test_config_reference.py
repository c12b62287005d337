"""The README's config reference is generated from config.py and fails on drift."""

from __future__ import annotations

import re
from pathlib import Path

from mmscale.config import iter_keys
from tools.config_reference import (
    END,
    README,
    START,
    current_table,
    field_descriptions,
    main,
    render_table,
    splice,
)


def test_readme_table_matches_the_dataclasses():
    table = current_table(README.read_text())
    assert table is not None, "README.md lacks the config-reference markers: run python tools/config_reference.py"
    assert table == render_table(), "README config reference is stale: run python tools/config_reference.py"


def test_every_key_appears_once_with_its_type():
    table = render_table()
    # Split rows on unescaped pipes only: `float \| None` is one cell.
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.splitlines() if line.startswith("| `")]
    assert all(len(row) == 4 for row in cells)
    keys = [row[0].strip().strip("`") for row in cells]
    assert keys == [key for key, _, _ in iter_keys()]
    types = {key: row[1].strip() for key, row in zip(keys, cells)}
    assert types["train.lr"] == "float"
    assert types["data.train_weights"] == "list[float]"


def test_descriptions_come_from_trailing_comments_and_docstrings():
    source = '''
from dataclasses import dataclass, field

@dataclass
class A:
    """Section."""

    x: int = 1  # the x | with a pipe
    y: list[int] = field(
        default_factory=list
    )  # comment on the closing line
    z: str = ""
    """A docstring under the field."""
    w: float = 0.5
'''
    d = field_descriptions(source)
    assert d[("A", "x")] == "the x | with a pipe"
    assert d[("A", "y")] == "comment on the closing line"
    assert d[("A", "z")] == "A docstring under the field."
    assert d[("A", "w")] == ""


def test_table_escapes_pipes_and_renders_yaml_defaults():
    table = render_table()
    row = next(line for line in table.splitlines() if line.startswith("| `data.mode`"))
    # An unescaped pipe inside the description would split the row into more cells.
    assert row.count(" | ") == 3 and "\\|" in row
    assert '`"epoch"`' in row
    assert "| `false` |" in next(line for line in table.splitlines() if line.startswith("| `train.offload`"))


def test_splice_only_touches_the_marked_section(tmp_path: Path):
    text = "# title\n\nintro\n"
    once = splice(text, "T1")
    assert once.startswith(text.rstrip("\n")) and once.rstrip().endswith(END)
    edited = once.replace("intro", "intro edited") + "\n## after\n"
    twice = splice(edited, "T2")
    assert "intro edited" in twice and twice.endswith("## after\n")
    assert f"{START}\nT2\n{END}" in twice and "T1" not in twice


def test_check_flag_detects_a_stale_readme(tmp_path: Path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert main(["--readme", str(readme), "--check"]) == 1
    assert main(["--readme", str(readme)]) == 0
    assert main(["--readme", str(readme), "--check"]) == 0
    readme.write_text(readme.read_text().replace("| `train.lr` |", "| `train.learning_rate` |"))
    assert main(["--readme", str(readme), "--check"]) == 1
