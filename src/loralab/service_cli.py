"""CLI commands for the service: `loralab serve` (API + embedded workers) and `loralab worker` (a worker alone)."""
from __future__ import annotations

import logging
import re
import signal

import typer

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
SETTING_HINTS = {"LORALAB_ROOT_PATH": "LORALAB_ROOT_PATH (--root-path) must be a path prefix such as /loralab or "
                                      "/tools/loralab: letters, digits, '.', '_', '~' and '-' between slashes"}
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
        root_path: str = typer.Option(None, help="Path prefix behind a reverse proxy, e.g. /loralab; the proxy "
                                                 "may strip it or keep it. Default: LORALAB_ROOT_PATH."),
        forwarded_allow_ips: str = typer.Option(None, help="Comma-separated proxy addresses whose X-Forwarded-For/"
                                                           "-Proto are trusted ('*' = any). Default: "
                                                           "LORALAB_FORWARDED_ALLOW_IPS (127.0.0.1,::1)."),
    ) -> None:
        """Run the HTTP API (docs at /docs) with N embedded training workers."""
        from pydantic import ValidationError

        from loralab.settings import Settings

        overrides = {}  # validated by the settings, so a bad option gets the same message as a bad variable
        if root_path is not None:  # "/loralab/" and "loralab" mean /loralab; "/" means none
            overrides["root_path"] = "/" + root_path.strip().strip("/") if root_path.strip("/ ") else ""
        if forwarded_allow_ips is not None:
            overrides["forwarded_allow_ips"] = forwarded_allow_ips
        try:
            settings = Settings(**overrides)
        except ValidationError as exc:
            for error in exc.errors():
                name = "LORALAB_" + "_".join(str(part) for part in error.get("loc", ())).upper()
                message = SETTING_HINTS.get(name) or error.get("msg", "invalid value").removeprefix("Value error, ")
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


class PathPrefix:
    """Serve under `prefix` whether the proxy strips it (/api/health) or keeps it (/loralab/api/health).

    uvicorn's own root_path always prepends the prefix, so a proxy that keeps it would double it. ASGI wants
    `path` to hold `root_path`: the routes, the security middleware and Gradio take the prefix off themselves.
    """

    def __init__(self, app, prefix: str):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and self.prefix:
            path = scope["path"]
            if not (path == self.prefix or path.startswith(self.prefix + "/")):
                raw = scope.get("raw_path") or path.encode()
                scope = {**scope, "path": self.prefix + path, "raw_path": self.prefix.encode() + raw}
            scope = {**scope, "root_path": self.prefix}
        await self.app(scope, receive, send)


def _server_class():
    """uvicorn.Server that stops the worker pool at the first SIGTERM/SIGINT, while requests drain."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, on_exit):
            super().__init__(config)
            self.on_exit = on_exit

        def handle_exit(self, sig, frame):
            self.on_exit()
            super().handle_exit(sig, frame)

    return Server


def _run(settings, host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    from loralab.api.app import create_app
    from loralab.runner.worker import WorkerPool
    from loralab.services.context import open_services

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = open_services(settings)
    pool = WorkerPool(services.db, settings, workers, notify=services.hub.publish)
    # After its drain uvicorn raises the signal again with the handler it found: this one, so the process lives on
    # to hand its running jobs back instead of dying with them (the default SIGTERM action).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pool.stop.set())
    pool.start()
    try:
        app = create_app(settings, services=services)
        if settings.root_path:
            app = PathPrefix(app, settings.root_path)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
                                proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips)
        # SIGTERM: uvicorn stops accepting and lets requests finish (up to shutdown_timeout_seconds) while the
        # workers checkpoint their jobs and hand them back (up to cancel_grace_seconds), both at once.
        server = _server_class()(config, on_exit=pool.stop.set)
        for name in ("uvicorn.access", "uvicorn.error"):  # after Config: it sets up uvicorn's loggers
            logging.getLogger(name).addFilter(RedactSecrets())
        if not pool.stop.is_set():  # a signal that came while the app was being built already asked to stop
            server.run()
    finally:
        pool.close(timeout=settings.cancel_grace_seconds + 5)
        services.close()
