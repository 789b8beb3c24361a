"""The public surface: every `dw.*` name resolves, every CLI command has --help with an example."""

import pytest
from click.testing import CliRunner

import dataworth as dw
from dataworth.cli import COMMANDS, cli


@pytest.mark.parametrize("name", dw.__all__)
def test_public_api_name_resolves(name):
    assert getattr(dw, name) is not None


@pytest.mark.parametrize("command", [m.replace("_", "-") for m, _ in COMMANDS])
def test_every_command_has_help_with_an_example(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output or "example" in res.output


def test_unknown_command_is_a_usage_error():
    assert CliRunner().invoke(cli, ["no-such-command"]).exit_code == 2


def test_stage_named_like_its_module_stays_callable(monkeypatch):
    """``dw.extract(...)`` calls the function even after ``import dataworth.extract`` (same name)."""
    import importlib

    for name in ("extract", "train", "generate", "report"):
        module = importlib.import_module(f"dataworth.{name}")
        calls = []
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append((a, k)) or "called")
        assert getattr(dw, name)(1, x=2) == "called" and calls == [((1,), {"x": 2})], name
