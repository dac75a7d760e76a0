"""The service container: settings, database, repository and the live-event hub, opened once per process."""
from __future__ import annotations

from dataclasses import dataclass, field

from loralab.runner.hub import DEFAULT_HUB, EventHub
from loralab.settings import Settings, get_settings
from loralab.store.db import Database, open_database
from loralab.store.repo import Repo


@dataclass
class Services:
    """What every use case needs; build it with `open_services()` and pass it to the service functions."""

    settings: Settings
    db: Database
    repo: Repo
    hub: EventHub = field(default_factory=lambda: DEFAULT_HUB)

    def close(self) -> None:
        self.db.dispose()


def open_services(settings: Settings | None = None, hub: EventHub | None = None) -> Services:
    """Open the database named by the settings (migrating it) and return the services over it."""
    settings = settings or get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.resolved_database_url(), lease_seconds=settings.lease_seconds)
    return Services(settings, db, Repo(db), hub or DEFAULT_HUB)
