"""Layer rules from DESIGN.md: engine and data know nothing of the web or the database."""
import subprocess
import sys

FORBIDDEN = ("fastapi", "sqlalchemy", "gradio", "starlette", "uvicorn", "alembic")


def test_engine_and_data_import_no_web_or_database():
    code = (
        "import sys\n"
        "import loralab.data.formats, loralab.data.template, loralab.engine.train, loralab.engine.run\n"
        "import loralab.engine.generate, loralab.engine.models, loralab.engine.evaluate, loralab.engine.export\n"
        "import loralab.engine.train as t; t._make_trainer_class()\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engine/data pulled in: {out.stdout}"


def test_no_shell_true_anywhere():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    offenders = [str(p) for p in src.rglob("*.py") if "shell=True" in p.read_text(encoding="utf-8")]
    assert offenders == []
