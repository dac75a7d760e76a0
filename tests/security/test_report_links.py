"""Issue 16 (low): the Evaluate page's report links open with a signed ticket for that evaluation, not the token."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

TOKEN = "test-token-0123456789abcdef"  # = tests/security/conftest.TOKEN (the live_token_server's token)
REPORT = "<html><body>report of {id}</body></html>"


@pytest.fixture(scope="module")
def evaluations(live_token_server):
    """Two evaluation jobs with report files, written into the live server's database and run directories."""
    from loralab.store import evaluations as store
    from loralab.store.db import open_database
    from loralab.store.repo import Repo

    home = live_token_server.home
    database = open_database(f"sqlite:///{home / 'loralab.db'}")
    try:
        ids = [store.create_evaluation_job(Repo(database), {"kind": "evaluation"}, None, f"eval {i}", []).id
               for i in range(2)]
    finally:
        database.dispose()
    for evaluation_id in ids:
        run = home / "runs" / evaluation_id
        run.mkdir(parents=True)
        (run / "report.html").write_text(REPORT.format(id=evaluation_id))
        (run / "report.en.html").write_text(REPORT.format(id=evaluation_id))
        (run / "report.md").write_text(f"# report of {evaluation_id}\n")
        (run / "results.csv").write_text("row,score\n1,0.5\n")
    return ids


def services(server) -> SimpleNamespace:
    """What tickets and the UI need of Services: the same home (so the same signing key) and the settings."""
    return SimpleNamespace(settings=SimpleNamespace(home=server.home, stream_ticket_seconds=60,
                                                    ui_session_seconds=3600))


def test_report_file_needs_the_token_or_a_ticket_for_that_evaluation(live_token_server, evaluations):
    from loralab.services.tickets import issue_ticket

    first, second = evaluations
    svc = services(live_token_server)
    url = f"/api/evaluations/{first}/files/report.html"
    with live_token_server.client() as client:
        assert client.get(url).status_code == 401
        assert client.get(url, params={"ticket": "garbage.garbage"}).status_code == 401
        assert client.get(url, params={"token": TOKEN}).status_code == 401  # the token never goes in a URL
        bearer = client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200 and first in bearer.text
        good = issue_ticket(svc, f"report:{first}")["ticket"]
        opened = client.get(url, params={"ticket": good})
        assert opened.status_code == 200 and first in opened.text
        assert "default-src 'none'" in opened.headers["content-security-policy"]
        assert client.get(f"/api/evaluations/{first}/files/report.md", params={"ticket": good}).status_code == 200
        other = issue_ticket(svc, f"report:{second}")["ticket"]
        assert client.get(url, params={"ticket": other}).status_code == 401
        expired = issue_ticket(svc, f"report:{first}", seconds=-1)["ticket"]
        assert client.get(url, params={"ticket": expired}).status_code == 401
        events = issue_ticket(svc, f"events:{first}")["ticket"]  # another scope of the same id
        assert client.get(url, params={"ticket": events}).status_code == 401
        # a ticket opens report files only: the evaluation itself and everything mutating still need the token
        assert client.get(f"/api/evaluations/{first}", params={"ticket": good}).status_code == 401
        assert client.post(f"/api/evaluations/{first}/cancel", params={"ticket": good}).status_code == 401
        assert client.get("/api/evaluations", params={"ticket": good}).status_code == 401


def test_the_evaluate_page_links_open_without_the_token(live_token_server, evaluations):
    from loralab.ui.evaluate import report_links

    first, _ = evaluations
    svc = services(live_token_server)
    files = {name: f"/api/evaluations/{first}/files/{name}" for name in ("report.html", "report.md", "results.csv")}
    text = report_links(svc, {"id": first, "files": files}, "en")
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert len(links) == 3 and all("ticket=" in link and TOKEN not in link for link in links)
    with live_token_server.client() as client:
        for link in links:
            assert client.get(link).status_code == 200, link
        assert client.get(links[0].split("?")[0]).status_code == 401
