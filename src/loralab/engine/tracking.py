"""Experiment tracking: TensorBoard in every run directory, MLflow and Weights & Biases when configured."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


def _importable(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in modules)


def tensorboard_available() -> bool:
    return _importable("tensorboard", "tensorboardX")


def mlflow_configured(env=os.environ) -> bool:
    return bool(env.get("MLFLOW_TRACKING_URI")) and _importable("mlflow")


def wandb_configured(env=os.environ) -> bool:
    mode = (env.get("WANDB_MODE") or "").lower()
    if mode == "disabled" or env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return False
    return bool(env.get("WANDB_API_KEY") or mode in ("offline", "online")) and _importable("wandb")


def configure(run_dir: Path, run_name: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """Pick the `report_to` integrations and return them with the links/paths summary.json lists.

    TensorBoard writes to RUN_DIR/tensorboard (through TENSORBOARD_LOGGING_DIR, which transformers'
    callback reads); MLflow and W&B are used only when their package is importable and configured.
    """
    run_dir = Path(run_dir)
    report_to: list[str] = []
    links: dict[str, Any] = {}
    if tensorboard_available():
        logdir = run_dir / TENSORBOARD_DIR
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)
        report_to.append("tensorboard")
        links["tensorboard"] = {"logdir": str(logdir), "command": f"tensorboard --logdir {logdir}"}
    if mlflow_configured():
        report_to.append("mlflow")
        if run_name:
            os.environ.setdefault("MLFLOW_RUN_NAME", run_name)
        links["mlflow"] = {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
                           "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME")}
    if wandb_configured():
        report_to.append("wandb")
        links["wandb"] = {"project": os.environ.get("WANDB_PROJECT", "huggingface"),
                          "mode": os.environ.get("WANDB_MODE", "online")}
    return report_to, links


def finish_links(links: dict[str, Any]) -> dict[str, Any]:
    """Add what only exists after training: the MLflow run id and the W&B run URL."""
    out = {k: dict(v) for k, v in links.items()}
    if "mlflow" in out:
        try:
            import mlflow

            run = mlflow.last_active_run()
            if run is not None:
                out["mlflow"]["run_id"] = run.info.run_id
        except Exception:  # tracking must never fail a finished run
            pass
    if "wandb" in out:
        try:
            import wandb

            run = wandb.run
            if run is not None:
                out["wandb"]["url"] = run.get_url()
        except Exception:
            pass
    return out
