"""`register` adds serve and worker to a Typer app; serve binds 127.0.0.1 by default."""
from __future__ import annotations

import typer
from typer.testing import CliRunner

from loralab.service_cli import register


def test_register_adds_serve_and_worker():
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert names == {"serve", "worker"}
    help_text = runner.invoke(app, ["serve", "--help"]).output
    assert "127.0.0.1" in help_text and "--workers" in help_text
