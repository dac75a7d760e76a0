"""The one containment check for paths built from request input, and the strict id patterns."""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

from loralab.store.errors import Invalid, NotFound

ID_PATTERNS = {
    "dataset": re.compile(r"^ds-[0-9a-f]{24}$"),
    "job": re.compile(r"^job-[0-9a-f]{24}$"),
    "model": re.compile(r"^ft-[0-9a-f]{24}$"),
    "base_model": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
}


def check_id(kind: str, value: str) -> str:
    """Return `value` if it matches the strict pattern for `kind`, else raise NotFound (ids never reach SQL or paths unchecked)."""
    if not isinstance(value, str) or not ID_PATTERNS[kind].fullmatch(value):
        raise NotFound(f"no {kind.replace('_', ' ')} {value!r}: ids look like "
                       f"{ID_PATTERNS[kind].pattern.strip('^$')}", code=f"{kind}_not_found")
    return value


def contain(root: Path | str, relative: str | os.PathLike = "") -> Path:
    """Resolve `relative` (percent-decoded, NFC-normalised) under `root`; raise Invalid if it escapes the root."""
    root_path = Path(root).resolve()
    text = unicodedata.normalize("NFC", unquote(os.fspath(relative)))
    if "\x00" in text:
        raise Invalid(f"path {text!r} contains a NUL byte", code="bad_path")
    candidate = (root_path / os.path.normpath(text)).resolve() if text else root_path
    if candidate != root_path and root_path not in candidate.parents:
        raise Invalid(f"path {text!r} is outside {root_path}; give a path inside it", code="bad_path")
    return candidate
