"""CLI commands for the service: `loralab serve` (API + embedded workers) and `loralab worker` (a worker alone)."""
from __future__ import annotations

import logging

import typer


def register(app: typer.Typer) -> None:
    """Add the `serve` and `worker` commands to the main CLI."""

    @app.command()
    def serve(
        host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the API to the network "
                                                   "(set LORALAB_API_TOKEN first)."),
        port: int = typer.Option(8000, help="TCP port."),
        workers: int = typer.Option(1, min=0, help="Training workers run inside this process (0 = API only; "
                                                   "run `loralab worker` elsewhere)."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
    ) -> None:
        """Run the HTTP API (docs at /docs) with N embedded training workers."""
        import uvicorn

        from loralab.api.app import create_app
        from loralab.runner.worker import WorkerPool
        from loralab.services.context import open_services
        from loralab.settings import get_settings

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings = get_settings()
        if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_token:
            typer.secho(f"warning: serving on {host} without LORALAB_API_TOKEN: anyone who can reach this port "
                        "can upload data and start jobs", fg=typer.colors.YELLOW, err=True)
        services = open_services(settings)
        pool = WorkerPool(services.db, settings, workers, notify=services.hub.publish)
        pool.start()
        try:
            uvicorn.run(create_app(settings, services=services), host=host, port=port, log_level=log_level)
        finally:
            pool.close(timeout=settings.cancel_grace_seconds + 5)
            services.close()

    @app.command()
    def worker() -> None:
        """Run one training worker against the configured database until SIGTERM/Ctrl-C."""
        from loralab.runner.worker import main

        main()
