"""Issue 16 (low items): the engine child's environment, a failed registry copy, SQLite's busy timeout, one
production/deployed version per name, and no absolute server paths in errors or /api/system-info."""
from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from service_fixtures import *  # noqa: E402,F401,F403  (db_url, fast_env, settings, repo, set_scenario...)
from service_fixtures import wait_for, worker_threads  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
# An engine that records its environment, then behaves like tests/fake_engine.py (RUN_DIR is appended).
ENV_DUMPING_ENGINE = (
    "import json, os, sys; json.dump(dict(os.environ), open(os.path.join(sys.argv[-1], 'env.json'), 'w'));"
    f"sys.path.insert(0, {str(TESTS)!r}); import fake_engine;"
    "sys.exit(fake_engine.main(['--scenario', os.environ.get('SCENARIO_FILE', '') or sys.argv[-2], sys.argv[-1]]))"
)
# An engine that fails with a message naming its absolute run directory.
PATH_ERROR_ENGINE = (
    "import json, os, sys, time; run = os.path.abspath(sys.argv[-1]);"
    "open(os.path.join(run, 'events.jsonl'), 'a').write(json.dumps({'type': 'error', 'time': time.time(),"
    " 'code': 'data_invalid', 'param': 'data', 'message': 'cannot read ' + os.path.join(run, 'x.jsonl')}) + '\\n');"
    "sys.exit(1)"
)


def queue_job(repo, settings, **spec) -> str:
    data = settings.home / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    job = repo.create_job({"base_model": "smollm2-135m-instruct", "data": {"path": str(data)}, **spec}, None, "m")
    repo.set_status(job.id, "queued")
    return job.id


def run_one(db, settings, repo, job_id, status="succeeded", timeout=30):
    starter = worker_threads(db, settings)
    next(starter)()
    try:
        wait_for(lambda: repo.get_job(job_id).status in ("succeeded", "failed", "cancelled"), timeout=timeout)
    finally:
        next(starter, None)
    row = repo.get_job(job_id)
    assert row.status == status, (row.status, row.error_code, row.error_message)
    return row


def test_engine_child_gets_an_allow_listed_environment(repo, settings, db, monkeypatch):
    secrets = {"LORALAB_API_TOKEN": "a-long-secret-token-0123456789", "SECRET_X": "planted",
               "AWS_SECRET_ACCESS_KEY": "aws", "LORALAB_JUDGE_API_KEY": "judge-key", "HF_TOKEN": "hf_secret",
               "PGPASSWORD": "pg"}
    needed = {"OMP_NUM_THREADS": "2", "HF_HOME": str(settings.home / "hf"), "LC_ALL": "C.UTF-8",
              "CUDA_VISIBLE_DEVICES": "", "LORALAB_ALLOCATOR": "system"}
    for key, value in {**secrets, **needed}.items():
        monkeypatch.setenv(key, value)
    settings.engine_command = [sys.executable, "-c", ENV_DUMPING_ENGINE, str(settings.home / "scenario.json")]
    job_id = queue_job(repo, settings)
    run_one(db, settings, repo, job_id)
    env = json.loads((settings.home / "runs" / job_id / "env.json").read_text())
    for key in secrets:
        assert key not in env, key
    assert "LORALAB_DATABASE_URL" not in env  # may hold a password
    for key, value in needed.items():
        assert env.get(key) == value, key
    assert env["LORALAB_HOME"] == str(settings.home) and env["PATH"]


def test_engine_env_gives_keys_only_to_jobs_that_need_them(settings):
    from loralab.runner.supervisor import engine_env

    environ = {"PATH": "/bin", "HF_TOKEN": "hf", "LORALAB_JUDGE_URL": "http://127.0.0.1:9/v1",
               "LORALAB_JUDGE_MODEL": "judge", "LORALAB_JUDGE_API_KEY": "k", "LORALAB_API_TOKEN": "t" * 20}
    train_local = engine_env({"base_model": "smollm2-135m-instruct"}, settings, environ)
    assert "HF_TOKEN" not in train_local and "LORALAB_JUDGE_API_KEY" not in train_local
    train_hub = engine_env({"base_model": "HuggingFaceTB/SmolLM2-360M"}, settings, environ)
    assert train_hub["HF_TOKEN"] == "hf" and "LORALAB_API_TOKEN" not in train_hub
    evaluation = engine_env({"kind": "evaluation", "base_model": "smollm2-135m-instruct", "judge": True},
                            settings, environ)
    assert evaluation["LORALAB_JUDGE_API_KEY"] == "k" and evaluation["LORALAB_JUDGE_URL"]
    no_judge = engine_env({"kind": "evaluation", "judge": False}, settings, environ)
    assert "LORALAB_JUDGE_API_KEY" not in no_judge


def test_registry_copy_failure_fails_the_job_and_keeps_the_run(repo, settings, db, set_scenario, monkeypatch):
    import loralab.runner.supervisor as supervisor

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(supervisor, "_link_or_copy", disk_full)
    settings.lease_seconds = 600  # a stuck job would stay running: the test must see it fail without a lease expiry
    set_scenario(total_steps=2, step_seconds=0.01)
    job_id = queue_job(repo, settings)
    started = time.monotonic()
    row = run_one(db, settings, repo, job_id, status="failed", timeout=60)
    assert time.monotonic() - started < 600
    assert row.error_code == "registry_copy_failed" and row.result_model_id is None
    assert "No space left on device" in row.error_message and str(settings.home) not in row.error_message
    run_dir = settings.home / "runs" / job_id
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "summary.json").is_file()
    registry = settings.home / "registry"
    assert not registry.exists() or not list(registry.iterdir())
    assert repo.list_models() == []
    assert repo.events_after(job_id)[-1].type == "error"
    assert repo.get_job(job_id).attempt == 1


@pytest.mark.parametrize("lease, expected", [(None, 10_000), (30.0, 10_000), (1.5, 500), (600.0, 10_000)])
def test_sqlite_busy_timeout_is_below_the_lease(loralab_home, lease, expected):
    from loralab.store.db import open_database

    db = open_database(f"sqlite:///{loralab_home / 'busy.db'}", lease_seconds=lease)
    try:
        with db.engine.connect() as conn:
            busy_ms = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    finally:
        db.dispose()
    assert busy_ms == expected
    if lease:
        assert busy_ms < lease * 1000


def test_one_production_and_one_deployed_version_per_name(db):
    from sqlalchemy.exc import IntegrityError

    from loralab.store.models import ModelVersion

    def version(n: int, **fields) -> ModelVersion:
        now = time.time()
        return ModelVersion(id=f"ft-{n:024x}", name="shared", version=n, base_model="b", method="lora", spec={},
                            path=f"/x/{n}", created_at=now, updated_at=now, **{"stage": "draft", "deployed": False,
                                                                                 **fields})

    for fields in ({"stage": "production"}, {"deployed": True}):
        with db.session() as s, s.begin():
            s.add(version(1, **fields))
        with pytest.raises(IntegrityError):
            with db.session() as s, s.begin():
                s.add(version(2, **fields))
        with db.session() as s, s.begin():
            s.query(ModelVersion).delete()
    with db.session() as s, s.begin():  # other stages repeat freely
        s.add_all([version(1, stage="archived"), version(2, stage="archived"), version(3, stage="staging"),
                   version(4, stage="staging")])


def test_repo_promotion_still_works_under_the_index(repo, db):
    now = time.time()
    from loralab.store.models import ModelVersion

    with db.session() as s, s.begin():
        for n in (1, 2):
            s.add(ModelVersion(id=f"ft-{n:024x}", name="m", version=n, base_model="b", method="lora", spec={},
                               path="p", stage="draft", deployed=False, created_at=now, updated_at=now))
    first, second = f"ft-{1:024x}", f"ft-{2:024x}"
    repo.set_stage(first, "production")
    repo.deploy(first)
    repo.set_stage(second, "production")
    repo.deploy(second)
    assert repo.get_model(first).stage == "archived" and not repo.get_model(first).deployed
    assert repo.get_model(second).stage == "production" and repo.get_model(second).deployed
    assert repo.rollback(second).id == first


def test_engine_error_with_an_absolute_path_is_stored_relative(repo, settings, db):
    settings.engine_command = [sys.executable, "-c", PATH_ERROR_ENGINE]
    job_id = queue_job(repo, settings)
    row = run_one(db, settings, repo, job_id, status="failed")
    home = str(settings.home)
    assert row.error_code == "data_invalid"
    assert home not in row.error_message and f"LORALAB_HOME/runs/{job_id}/x.jsonl" in row.error_message
    stored = json.dumps([e.payload for e in repo.events_after(job_id)])
    assert home not in stored


def test_crash_message_has_no_absolute_path(repo, settings, db, set_scenario):
    set_scenario(crash_at_step=1, stderr=f"loading {settings.home / 'models' / 'x'}")
    job_id = queue_job(repo, settings)
    row = run_one(db, settings, repo, job_id, status="failed")
    assert row.error_code == "engine_crashed"
    assert str(settings.home) not in row.error_message and "LORALAB_HOME/runs/" in row.error_message
    assert str(settings.home) not in json.dumps([e.payload for e in repo.events_after(job_id)])


def test_system_info_shows_no_server_path(settings):
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app

    with TestClient(create_app(settings, mount_web_ui=False), base_url="http://127.0.0.1") as client:
        response = client.get("/api/system-info")
    assert response.status_code == 200, response.text
    assert str(settings.home) not in response.text and str(settings.home.resolve()) not in response.text
    assert response.json()["disk"]["free_bytes"] > 0


def test_report_shows_paths_relative_to_home(tmp_path):
    from loralab.engine.report import shown_path

    home = tmp_path / "home"
    assert shown_path(str(home / "registry" / "ft-1"), home) == "LORALAB_HOME/registry/ft-1"
    assert shown_path("/srv/elsewhere/data.jsonl", home) == "data.jsonl"
    assert shown_path("smollm2-135m-instruct", home) == "smollm2-135m-instruct"
