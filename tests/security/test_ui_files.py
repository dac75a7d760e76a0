"""Issue 16 item 1: a Gradio event that takes a file reads only what the browser uploaded, never another server file."""
from __future__ import annotations

import json
import re
import os
import secrets
from pathlib import Path

import pytest

SECRET_ROWS = [{"instruction": "what is the vault code", "output": "vault-code-7f3a9c"}] * 3
SECRET_JSON = {"aws_access_key_id": "AKIAFAKEKEY0001", "aws_secret_access_key": "fake-secret-key-0002"}
NEEDLES = ("vault-code-7f3a9c", "vault code", "aws_access_key_id", "aws_secret_access_key", "AKIAFAKEKEY0001",
           "fake-secret-key-0002")


# ---- the check itself -----------------------------------------------------------------------------------------

@pytest.fixture
def upload_root(tmp_path, monkeypatch):
    """A private Gradio upload folder (GRADIO_TEMP_DIR is read on every call) with one uploaded file in it."""
    root = tmp_path / "gradio-uploads"
    (root / "0123abcd").mkdir(parents=True)
    (root / "0123abcd" / "data.jsonl").write_text('{"text": "hi"}\n')
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(root))
    return root


def test_uploaded_file_accepts_only_regular_files_inside_the_upload_folder(upload_root, tmp_path):
    from loralab.ui.uploads import upload_folder, uploaded_file

    assert upload_folder() == upload_root.resolve()
    inside = upload_root / "0123abcd" / "data.jsonl"
    assert uploaded_file(str(inside)) == inside.resolve()
    assert uploaded_file(inside) == inside.resolve()

    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps(SECRET_ROWS[0]) + "\n")
    (upload_root / "0123abcd" / "link.jsonl").symlink_to(secret)
    (upload_root / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    refused = [
        str(secret),                                                  # an absolute foreign path
        f"{upload_root}/../secret.jsonl",                             # ../ out of the folder
        f"{upload_root}/0123abcd/../../secret.jsonl",
        str(upload_root / "0123abcd" / "link.jsonl"),                 # a symlink inside pointing outside
        str(upload_root / "linkdir" / "secret.jsonl"),                # through a symlinked directory
        str(upload_root), str(upload_root / "0123abcd"),              # the folder and directories in it
        str(upload_root / "0123abcd" / "missing.jsonl"),
        "0123abcd/data.jsonl", "", "/etc/passwd", f"{inside}\x00.png",
        "http://127.0.0.1:1/data.jsonl", None, 42,
    ]
    for path in refused:
        assert uploaded_file(path) is None, path


def test_the_component_refuses_to_copy_a_foreign_path_into_the_cache(upload_root, tmp_path):
    """The datasets drop zone raises before Gradio copies anything; an upload goes through."""
    import gradio as gr

    from loralab.ui.uploads import only_uploads

    secret = tmp_path / "secret.jsonl"
    secret.write_text("x\n")
    component = only_uploads(gr.File(type="filepath"))
    before = sorted(p for p in upload_root.rglob("*"))
    with pytest.raises(gr.Error) as info:
        component.move_resource_to_block_cache(str(secret))
    assert str(tmp_path) not in str(info.value) and "ファイル" in str(info.value)
    assert sorted(p for p in upload_root.rglob("*")) == before
    inside = upload_root / "0123abcd" / "data.jsonl"
    assert component.move_resource_to_block_cache(str(inside)) == str(inside)


# ---- the attack against a real server -------------------------------------------------------------------------

def event_index(client, elem_id: str, trigger: str) -> tuple[int, int]:
    """(fn_index, number of inputs) of the event `trigger` of the component with this elem_id, from /config."""
    config = client.get("/config").json()
    component = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
    dep = next(d for d in config["dependencies"] if [component, trigger] in d["targets"])
    return dep["id"], len(dep["inputs"])


def run_event(client, fn_index: int, data: list) -> dict:
    """Call an event the way Gradio's JS client does (queue/join, then read the SSE stream); the final message."""
    session = secrets.token_hex(8)
    joined = client.post("/gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": fn_index,
                                                         "trigger_id": None, "session_hash": session})
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                return message
    raise AssertionError("the event stream ended without process_completed")


def file_data(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture(scope="module")
def secrets_outside(live_server):
    """A secret JSONL and a fake credentials JSON next to the server's home (outside Gradio's upload folder)."""
    outside = live_server.home.parent
    jsonl = outside / "secret.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in SECRET_ROWS))
    creds = outside / "credentials.json"
    creds.write_text(json.dumps(SECRET_JSON))
    return jsonl, creds


def test_a_queue_call_naming_a_server_file_stores_nothing(live_server, secrets_outside):
    jsonl, creds = secrets_outside
    with live_server.client() as client:
        fn_index, count = event_index(client, "ds-upload", "upload")
        assert count == 4  # file, name, format, language
        from gradio.utils import get_upload_folder

        upload_dir = os.path.realpath(get_upload_folder())
        attempts = [str(jsonl), str(creds), f"{upload_dir}/../..{jsonl}", f"{upload_dir}/x/../../..{creds}"]
        for path in attempts:
            message = run_event(client, fn_index, [file_data(path, Path(path).name), "", "auto", "en"])
            text = json.dumps(message, ensure_ascii=False)
            for needle in NEEDLES:
                assert needle not in text, (path, text)
            assert str(live_server.home) not in text  # (Gradio's refusal echoes only the caller's own path)
            outputs = (message.get("output") or {}).get("data") or []
            refused = not message.get("success") or "Nothing was saved" in json.dumps(outputs)
            assert refused, text
        assert client.get("/api/datasets").json() == []
        assert not list((live_server.home / "datasets").glob("*/records.jsonl"))
        # nothing was copied into Gradio's cache either (it would be served by /gradio_api/file=)
        copies = [p for p in Path(upload_dir).rglob("*") if p.name in (jsonl.name, creds.name)]
        assert not [p for p in copies if "vault-code-7f3a9c" in p.read_text(errors="replace")
                    or "AKIAFAKEKEY0001" in p.read_text(errors="replace")]
    log = live_server.output()
    for needle in NEEDLES:
        assert needle not in log


def test_a_real_upload_through_the_same_event_is_stored(live_server, secrets_outside):
    """The control: the same call with a file uploaded first (POST /gradio_api/upload) imports it."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with live_server.client() as client:
        fn_index, _ = event_index(client, "ds-upload", "upload")
        uploaded = client.post("/gradio_api/upload", files={"files": ("mine.jsonl", body)})
        assert uploaded.status_code == 200, uploaded.text
        path = uploaded.json()[0]
        message = run_event(client, fn_index, [file_data(path, "mine.jsonl"), "mine", "auto", "en"])
        assert message.get("success"), message
        stored = client.get("/api/datasets").json()
        assert [d["name"] for d in stored] == ["mine"] and stored[0]["rows"] == 3


def component_events(client, types: tuple[str, ...]) -> list[tuple[int, list[int], dict]]:
    """(fn_index, inputs, components by id) of every backend event with an input of one of these types."""
    config = client.get("/config").json()
    by_id = {c["id"]: c for c in config["components"]}
    return [(d["id"], d["inputs"], by_id) for d in config["dependencies"]
            if d.get("backend_fn") and any(by_id[i]["type"] in types for i in d["inputs"])]


def test_no_event_input_copies_a_server_file_into_gradio_cache(live_server, secrets_outside):
    """Any input (a Chatbot's history, a Radio) naming a server file: refused, never copied or served back."""
    jsonl, _ = secrets_outside
    bad = file_data(str(jsonl), jsonl.name)
    from gradio.utils import get_upload_folder

    upload_dir = Path(os.path.realpath(get_upload_folder()))
    with live_server.client() as client:
        events = component_events(client, ("chatbot",))[:1] + component_events(client, ("radio",))[:1]
        assert len(events) == 2
        for fn_index, inputs, by_id in events:
            data = [by_id[i]["props"].get("value") for i in inputs]
            for i, component in enumerate(inputs):
                kind = by_id[component]["type"]
                if kind == "chatbot":
                    data[i] = [{"role": "user", "content": [{"type": "file", "file": bad}]}]
                elif kind == "radio":
                    data[i] = bad
            if by_id[inputs[0]]["type"] == "textbox":
                data[0] = ""  # the playground answers nothing: its history would come straight back
            text = json.dumps(run_event(client, fn_index, data), ensure_ascii=False)
            for needle in NEEDLES:
                assert needle not in text, text
            for url in {*re.findall(r"/gradio_api/file=[^\"' ]+", text)}:
                assert "vault-code-7f3a9c" not in client.get(url).text, url
        copies = [p for p in upload_dir.rglob(jsonl.name) if p.is_file()]
        assert not [p for p in copies if "vault-code-7f3a9c" in p.read_text(errors="replace")]
