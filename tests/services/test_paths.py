"""The one containment check and the strict id patterns."""
from __future__ import annotations

import pytest

from loralab.store.errors import Invalid, NotFound
from loralab.store.paths import check_id, contain


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "%2e%2e/x", "..%2Fx", "/etc/passwd", "a\x00b", "%00"])
def test_contain_rejects_escapes(tmp_path, bad):
    with pytest.raises(Invalid):
        contain(tmp_path / "root", bad)


def test_contain_accepts_inside_and_symlink_escape_is_caught(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert contain(root, "a/b.txt") == (root / "a" / "b.txt").resolve()
    assert contain(root, str(root / "a")) == (root / "a").resolve()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(Invalid):
        contain(root, "link/secret")


@pytest.mark.parametrize("kind,value", [("job", "job-" + "a" * 24), ("dataset", "ds-" + "0" * 24),
                                        ("model", "ft-" + "f" * 24), ("base_model", "smollm2-135m-instruct")])
def test_check_id_accepts(kind, value):
    assert check_id(kind, value) == value


@pytest.mark.parametrize("kind,value", [("job", "job-" + "A" * 24), ("job", "job-../x"), ("dataset", "ds-1"),
                                        ("model", "ft-" + "g" * 24), ("base_model", "../etc"),
                                        ("base_model", ".hidden")])
def test_check_id_rejects(kind, value):
    with pytest.raises(NotFound):
        check_id(kind, value)
