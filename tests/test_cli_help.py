"""Every command's ``--help``: a one-line description, every option explained, two examples.

Iterates over ``main.commands``, so commands added later are held to the same rule.
"""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from ckptfit.cli import main


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _examples(text: str, prefix: str) -> list[str]:
    assert "Examples:" in text, f"no 'Examples:' section in:\n{text}"
    after = text.split("Examples:", 1)[1]
    return [ln.strip() for ln in after.splitlines() if ln.strip().startswith(prefix)]


def test_main_help_lists_commands_and_examples() -> None:
    text = _help()
    assert main.help and main.help.strip().splitlines()[0]
    for name in main.commands:
        assert f"  {name} " in text, f"{name} missing from `ckptfit --help`"
    assert len(_examples(text, "ckptfit ")) >= 2


@pytest.mark.parametrize("name", sorted(main.commands))
def test_command_help(name: str) -> None:
    command = main.commands[name]
    text = _help(name)
    # one-line description: short enough not to be cut in `ckptfit --help`'s list
    assert command.help and command.help.strip(), f"`ckptfit {name}` has no description"
    first = command.help.strip().splitlines()[0]
    assert first.endswith(".") and len(first) <= 64, f"`ckptfit {name}`: first line too long or unfinished: {first!r}"
    assert "..." not in command.get_short_help_str(limit=80), f"`ckptfit {name}`: short help is cut"
    # two examples of this very command
    examples = _examples(text, f"ckptfit {name}")
    assert len(examples) >= 2, f"`ckptfit {name} --help` needs two examples, has {examples}"
    # every option explained; a default that is not obvious is shown
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        assert param.help, f"`ckptfit {name}` option {param.opts[0]} has no help text"
        default = param.get_default(click.Context(command), call=False)
        unset = type(default).__name__ == "Sentinel"  # click >= 8.3 marks "no default" with a sentinel
        if param.is_flag or param.multiple or unset or default in (None, False, ()):
            continue
        assert param.show_default or "default" in param.help.lower(), \
            f"`ckptfit {name}` option {param.opts[0]} has default {default!r} but does not show it"
