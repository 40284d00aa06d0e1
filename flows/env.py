"""Process defaults set before Prefect or MLflow are imported: no telemetry, patient start-up.

Prefect 3 with no ``PREFECT_API_URL`` starts a temporary local server per process; on a
busy 2-core machine that can take longer than its 20 s default, so the timeout is raised.
Values already in the environment win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "ORT_DISABLE_TELEMETRY": "1",  # onnxruntime's usage uploader
}


def set_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


set_defaults()
