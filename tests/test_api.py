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


def test_public_names_are_the_functions_of_their_stage_modules():
    """``dw.extract`` is `dataworth.gradients.extract.extract` (a function, not a module), and so on for every
    name: the package root only points into the stage modules."""
    import importlib
    import inspect

    for name, module in dw._API.items():
        value = getattr(dw, name)
        assert not inspect.ismodule(value), name
        assert value is getattr(importlib.import_module(module), name), name
    assert set(dw.__all__) <= set(dir(dw))
