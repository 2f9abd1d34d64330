"""The docs say what the code does: the configuration table, commands, metrics."""

from __future__ import annotations

import re

from sandboxd.cli import build_parser
from sandboxd.cli.serve import OPTIONS, config_table
from sandboxd.observability.metrics import Metrics

from .cli_helpers import cli
from .conftest import ROOT

TOUR = ROOT / "README.md"


def _between_markers(text: str) -> str:
    m = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", text, re.S)
    assert m, "README.md lost its config-table markers"
    return m.group(1)


def test_config_table_in_docs_is_generated_from_the_flags() -> None:
    expected = config_table()
    assert _between_markers(TOUR.read_text()) == expected, (
        "README.md is out of date; put this between the config-table markers:\n" + expected
    )


def test_every_flag_and_variable_of_serve_help_is_in_the_table() -> None:
    r = cli(None, "serve", "--help")
    assert r.returncode == 0
    table = _between_markers(TOUR.read_text())
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", r.stdout)) - {"--help"}
    assert flags == {o.flag for o in OPTIONS}
    for flag in flags:
        assert f"`{flag}`" in table
    for var in set(re.findall(r"SANDBOXD_[A-Z0-9_]+", r.stdout)):
        assert f"`{var}" in table, var


def test_every_environment_variable_in_the_code_is_documented() -> None:
    tour = TOUR.read_text()
    found = set()
    for path in (ROOT / "src" / "sandboxd").rglob("*.py"):
        found |= set(re.findall(r"SANDBOXD_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    prefixes = {v for v in found if any(o != v and o.startswith(v + "_") for o in found)}
    for var in sorted(found - prefixes):
        assert f"`{var}" in tour, f"{var} is read by the code but missing from README.md"


def test_every_command_is_documented() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"sandboxd {name}" in doc, name


def _commands(parser: object, prefix: str) -> list[str]:
    """Every command line path down to a leaf: ``sandboxd sbx pool ls`` and so on."""
    out = []
    for action in parser._actions:  # type: ignore[attr-defined]
        if action.dest in ("cmd", "sbx_cmd", "pool_cmd"):
            for name, child in action.choices.items():
                out += [f"{prefix} {name}", *_commands(child, f"{prefix} {name}")]
    return out


def test_every_sbx_command_is_documented() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    nested = [c for c in _commands(build_parser(), "sandboxd") if c.startswith("sandboxd sbx ")]
    assert "sandboxd sbx pool rm" in nested and "sandboxd sbx describe" in nested
    for command in nested:
        assert f"{command} " in doc or f"{command}`" in doc, command


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    names = {f.name for f in Metrics().registry.collect() if f.name.startswith("sandboxd_")}
    assert len(names) >= 12
    for name in names:
        assert f"`{name}" in doc, name
