"""A/B tests end to end: simulated users through `ab:<name>`, scripted feedback, significance, stickiness, promote."""
from __future__ import annotations

import shutil
from collections import defaultdict

import pytest

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
TARGETS = ["q_proj", "v_proj"]
FAVOUR_B = {"A": [2, 3, 2, 3, 4], "B": [5, 4, 5, 4, 3]}  # means 2.8 vs 4.2
EQUAL = {"A": [1, 2, 3, 4, 5], "B": [1, 2, 3, 4, 5]}


@pytest.fixture
def tiny(settings, tiny_model_dir):
    shutil.copytree(tiny_model_dir, settings.home / "models" / "tiny")
    return "tiny"


@pytest.fixture
def tuned(client, settings, tiny):
    """A LoRA version of the tiny base in the registry (recorded the way the supervisor records one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    repo = client.app.state.services.repo
    job = repo.create_job({"method": "lora"}, None, "bot")
    repo.set_status(job.id, "queued")
    claim = repo.claim_job("test-worker", 30)
    model_id = "ft-" + "7" * 24
    base = str(settings.home / "models" / tiny)
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(settings.home / "registry" / model_id)
    repo.finish_job(claim, "succeeded", model=dict(
        id=model_id, name="bot", base_model=base, method="lora", dataset_id=None, job_id=claim.job_id, lineage={},
        spec={"method": "lora"}, metrics={}, path=str(settings.home / "registry" / model_id)))
    return model_id


def simulate(client, name: str, users: int, per_user: int, ratings: dict[str, list[int]]) -> dict[str, set]:
    """`users` x `per_user` chat requests to ab:<name>, each answer rated by the script of the arm it came from."""
    arms_seen: dict[str, set] = defaultdict(set)
    given = {"A": 0, "B": 0}
    for i in range(users * per_user):
        user = f"user-{i % users}"
        response = client.post("/v1/chat/completions", json={
            "model": f"ab:{name}", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 1,
            "user": user})
        assert response.status_code == 200, response.text
        body = response.json()
        arm = body["ab_test"]["arm"]
        arms_seen[user].add(arm)
        rating = ratings[arm][given[arm] % len(ratings[arm])]
        given[arm] += 1
        assert client.post("/api/feedback", json={"generation_id": body["id"], "rating": rating,
                                                  "user": user}).status_code == 201
    return arms_seen


def test_simulated_users_b_wins_and_is_promoted(client, tiny, tuned):
    created = client.post("/api/ab-tests", json={"name": "bot-vs-base", "model_a": tiny, "model_b": tuned,
                                                 "split": 0.5, "metric": "mean_rating"})
    assert created.status_code == 201, created.text
    test = created.json()
    assert test["endpoint"] == "ab:bot-vs-base" and test["status"] == "active"

    arms_seen = simulate(client, "bot-vs-base", users=40, per_user=5, ratings=FAVOUR_B)
    assert all(len(arms) == 1 for arms in arms_seen.values()), arms_seen  # sticky per user
    assert {next(iter(a)) for a in arms_seen.values()} == {"A", "B"}  # a 50/50 split used both arms

    results = client.get(f"/api/ab-tests/{test['id']}/results").json()
    arms = {a["arm"]: a for a in results["arms"]}
    assert arms["A"]["requests"] + arms["B"]["requests"] == 200
    assert arms["A"]["feedback"] == arms["A"]["requests"] and arms["B"]["model"] == tuned
    assert arms["B"]["value"] > arms["A"]["value"]
    low, high = arms["B"]["ci95"]
    assert low < arms["B"]["value"] < high
    assert results["statistic"] == "Mann-Whitney U" and results["p_value"] < 0.05
    assert results["winner"] == "B" and results["winner_model"] == tuned
    assert 2 <= results["min_sample_per_arm"] <= min(arms["A"]["scored"], arms["B"]["scored"])
    assert results["sticky_violations"] == 0 and results["subjects"] == 40

    # the stored generations say which model served each arm
    served = client.get("/api/feedback", params={"ab_test_id": test["id"], "limit": 1000}).json()["data"]
    assert {(f["arm"], f["model"]) for f in served} == {("A", tiny), ("B", tuned)}

    promoted = client.post(f"/api/ab-tests/{test['id']}/promote")
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["model"]["id"] == tuned and promoted.json()["model"]["stage"] == "production"
    assert client.get(f"/api/models/{tuned}").json()["stage"] == "production"
    assert client.get(f"/api/ab-tests/{test['id']}").json()["status"] == "stopped"
    after = client.post("/v1/chat/completions", json={"model": "ab:bot-vs-base", "messages": [
        {"role": "user", "content": "x"}], "max_tokens": 1})
    assert after.status_code == 409 and after.json()["error"]["code"] == "ab_test_stopped"
    gone = client.post("/api/generate", json={"model": "ab:nothing", "prompt": "x"})
    assert gone.status_code == 404


def test_equal_feedback_declares_no_winner(client, tiny, tuned):
    test = client.post("/api/ab-tests", json={"name": "same", "model_a": tiny, "model_b": tuned,
                                              "metric": "thumbs_up_rate"}).json()
    simulate(client, "same", users=20, per_user=5, ratings=EQUAL)
    results = client.get(f"/api/ab-tests/{test['id']}/results").json()
    assert results["statistic"] == "two-proportion z-test"
    assert results["p_value"] >= 0.05 and results["winner"] is None and not results["significant"]
    refused = client.post(f"/api/ab-tests/{test['id']}/promote")
    assert refused.status_code == 409 and refused.json()["code"] == "no_winner"
    stopped = client.post(f"/api/ab-tests/{test['id']}/stop").json()
    assert stopped["test"]["status"] == "stopped" and stopped["winner"] is None


def test_generate_route_and_session_header_are_sticky(client, tiny, tuned):
    test = client.post("/api/ab-tests", json={"name": "gen", "model_a": tiny, "model_b": tuned,
                                              "split": 0.3}).json()
    for session in ("s1", "s2", "s3"):
        arms = set()
        for _ in range(3):
            body = client.post("/api/generate", json={"model": "ab:gen", "prompt": "x", "max_new_tokens": 1},
                               headers={"X-Session-Id": session}).json()
            arms.add(body["arm"])
            assert body["model"] == (tiny if body["arm"] == "A" else tuned)
        assert len(arms) == 1
    completion = client.post("/v1/completions", json={"model": "ab:gen", "prompt": "x", "max_tokens": 1},
                             headers={"X-Session-Id": "s1"}).json()
    generation = client.get(f"/api/generations/{completion['id']}").json()
    assert generation["ab_test_id"] == test["id"] and generation["subject"] == "s1"


def test_base_model_winner_is_not_promoted(client, settings, tiny, tuned):
    test = client.post("/api/ab-tests", json={"name": "base-wins", "model_a": tiny, "model_b": tuned}).json()
    simulate(client, "base-wins", users=10, per_user=4, ratings={"A": [5], "B": [1]})
    assert client.get(f"/api/ab-tests/{test['id']}/results").json()["winner"] == "A"
    refused = client.post(f"/api/ab-tests/{test['id']}/promote")
    assert refused.status_code == 409 and refused.json()["code"] == "base_model"
    assert "base model" in refused.json()["detail"]


def test_bad_ab_tests_are_422_naming_the_field(client, tiny, tuned):
    def field(body):
        response = client.post("/api/ab-tests", json={"name": "t", "model_a": tiny, "model_b": tuned, **body})
        assert response.status_code == 422, response.text
        detail = response.json()
        return detail["detail"][0]["loc"][-1] if isinstance(detail["detail"], list) else detail["param"]

    assert field({"model_b": tiny}) == "model_b"
    assert field({"split": 1.5}) == "split"
    assert field({"split": 0}) == "split"
    assert field({"split": -0.1}) == "split"
    assert field({"metric": "vibes"}) == "metric"
    assert field({"model_a": "no-such-model"}) == "model_a"
    assert field({"name": "bad name!"}) == "name"
    assert client.post("/api/ab-tests", json={"name": "t", "model_a": tiny, "model_b": tuned}).status_code == 201
    duplicate = client.post("/api/ab-tests", json={"name": "t", "model_a": tiny, "model_b": tuned})
    assert duplicate.status_code == 409
    assert client.get("/api/ab-tests/ab-" + "0" * 24 + "/results").status_code == 404
