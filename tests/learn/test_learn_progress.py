"""The former progress.json is imported into the database once, for the local user, and then left alone."""
from __future__ import annotations

import json

import pytest


def _open():
    from loralab.services.context import open_services

    return open_services()


def _legacy_file(home, **topics) -> None:
    path = home / "learn" / "progress.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "topics": topics}), encoding="utf-8")


def test_old_progress_file_is_imported_once(loralab_home):
    from loralab.services import learning

    _legacy_file(loralab_home,
                 lora={"read_at": 100.0, "quiz": {"attempts": 3, "best_score": 4, "last_score": 1, "total": 4,
                                                  "passed": True, "last_at": 200.0}},
                 tokens={"read_at": None, "quiz": {"attempts": 1, "best_score": 1, "last_score": 1, "total": 3,
                                                   "passed": False, "last_at": 150.0}},
                 **{"first-fine-tune": {"steps": {"compare": 120.0}}})
    svc = _open()
    try:
        progress = learning.get_progress(svc, "local")
        topics = {t["id"]: t for t in progress["topics"]}
        lora = topics["lora"]
        assert lora["read"] and lora["read_at"] == 100.0
        assert lora["quiz"]["best"]["score"] == 4 and lora["quiz"]["latest"]["score"] == 1 and lora["quiz"]["passed"]
        assert topics["tokens"]["quiz"]["attempts"] == 1 and not topics["tokens"]["quiz"]["passed"]
        assert not topics["tokens"]["read"]
        assert {s["id"]: s["done"] for s in topics["first-fine-tune"]["steps"]}["compare"]
        # other learners do not inherit the local user's file
        assert not {t["id"]: t for t in learning.get_progress(svc, "b-other")["topics"]}["lora"]["read"]
        learning.submit_quiz(svc, "local", "tokens", {"japanese-tokens": "d"}, "en")
    finally:
        svc.close()
    assert (loralab_home / "learn" / "progress.json").is_file()  # left in place
    _legacy_file(loralab_home, lora={"read_at": 1.0})  # changed afterwards: not imported again
    svc = _open()
    try:
        topics = {t["id"]: t for t in learning.get_progress(svc, "local")["topics"]}
        assert topics["lora"]["read_at"] == 100.0 and topics["tokens"]["quiz"]["attempts"] == 2
    finally:
        svc.close()


def test_corrupt_old_file_is_a_clear_error(loralab_home):
    from loralab.services import learning
    from loralab.services.errors import Invalid

    path = loralab_home / "learn" / "progress.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    svc = _open()
    try:
        with pytest.raises(Invalid, match="delete it"):
            learning.get_progress(svc, "local")
        assert learning.get_progress(svc, "b-browser")["summary"]["read"] == 0  # browser users are unaffected
    finally:
        svc.close()
