"""CLI commands for the service: `loralab serve` (API + embedded workers) and `loralab worker` (a worker alone)."""
from __future__ import annotations

import logging
import re

import typer

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
_SECRET_QUERY = re.compile(r"([?&](?:token|ticket)=)[^&\s\"]*", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Access-log lines never show `?token=` or `?ticket=` values (URLs end up in logs and shell histories)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_SECRET_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _SECRET_QUERY.sub(r"\1[redacted]", record.msg)
        return True


def register(app: typer.Typer) -> None:
    """Add the `serve` and `worker` commands to the main CLI."""

    @app.command()
    def serve(
        host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback exposes the API to the "
                                                   "network and needs LORALAB_API_TOKEN."),
        port: int = typer.Option(8000, help="TCP port."),
        workers: int = typer.Option(1, min=0, help="Training workers run inside this process (0 = API only; "
                                                   "run `loralab worker` elsewhere)."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
    ) -> None:
        """Run the HTTP API (docs at /docs) with N embedded training workers."""
        from pydantic import ValidationError

        from loralab.settings import get_settings

        try:
            settings = get_settings()
        except ValidationError as exc:
            for error in exc.errors():
                name = "LORALAB_" + "_".join(str(part) for part in error.get("loc", ())).upper()
                message = error.get("msg", "invalid value").removeprefix("Value error, ")
                typer.secho(f"error: {message}" if name in message else f"error: {name}: {message}",
                            fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        if host.strip("[]") not in LOOPBACK and not settings.api_token:
            typer.secho(f"error: refusing to serve on {host} without LORALAB_API_TOKEN: anyone who can reach this "
                        "port could read your data and start jobs. Set LORALAB_API_TOKEN to a long random value "
                        "(python -c \"import secrets; print(secrets.token_urlsafe(32))\"), or bind 127.0.0.1.",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        if host.strip("[]") not in LOOPBACK + WILDCARD and host not in settings.allowed_hosts:
            settings.allowed_hosts.append(host.strip("[]"))  # the bound address is a name clients will use
        _run(settings, host, port, workers, log_level)

    @app.command()
    def worker() -> None:
        """Run one training worker against the configured database until SIGTERM/Ctrl-C."""
        from loralab.runner.worker import main

        main()


def _run(settings, host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    from loralab.api.app import create_app
    from loralab.runner.worker import WorkerPool
    from loralab.services.context import open_services

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = open_services(settings)
    pool = WorkerPool(services.db, settings, workers, notify=services.hub.publish)
    pool.start()
    try:
        config = uvicorn.Config(create_app(settings, services=services), host=host, port=port, log_level=log_level)
        server = uvicorn.Server(config)
        for name in ("uvicorn.access", "uvicorn.error"):  # after Config: it sets up uvicorn's loggers
            logging.getLogger(name).addFilter(RedactSecrets())
        server.run()
    finally:
        pool.close(timeout=settings.cancel_grace_seconds + 5)
        services.close()
