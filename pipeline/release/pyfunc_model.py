"""The serving bundle as an MLflow pyfunc model (models-from-code: MLflow runs this file).

:func:`pipeline.release.registry.log_bundle_model` logs this file as the model's code and the bundle
directory as its artifact "bundle". When MLflow loads the model (``mlflow.pyfunc.load_model``,
``mlflow models serve``) it executes this file, takes the model passed to
``mlflow.models.set_model`` and calls ``load_context``, which builds a
:class:`pipeline.serving.retriever.Retriever` over the downloaded bundle (checksums checked first).

``predict`` takes a DataFrame, one request per row:

- ``user``        raw user id (a known user), or null / an unknown id for a cold start;
- ``k``           optional, results per request (default 10);
- ``history``     optional, raw item ids oldest first (a list, or one comma-separated string);
- ``attributes``  optional, {attribute name: raw value} for a cold start;
- ``exclude_seen`` optional, default true.

and returns a DataFrame with ``user``, ``items`` (raw ids, best first) and ``scores``. The
model config key ``backend`` ("auto", "onnx", "torch") picks the user tower's runtime: ONNX, or
the tower rebuilt in torch from the bundle's ``user_tower.safetensors`` and tower config (never
the ``torch.export`` program, whose loader unpickles). Either way the Retriever first checks
every backend it loads against the bundle's probe users and refuses a bundle that disagrees.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_K = 10


def _cell(row: dict[str, Any], key: str) -> Any:
    """A row's value, None when the column is absent or the cell is null / NaN."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple | dict | np.ndarray) and pd.isna(value):
        return None  # NaN, pd.NA, NaT: pandas' ways of saying "no value"
    return value


def _history(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [h.strip() for h in value.split(",") if h.strip()]
    return [str(h) for h in value]


class BundleModel(PythonModel):
    """Recommendations from a serving bundle for each row of a request DataFrame."""

    def load_context(self, context) -> None:
        """Build the Retriever from the logged bundle (a BundleError if it fails its checks:
        checksums, paths inside the bundle, probe users)."""
        from pipeline.serving.retriever import Retriever

        config = context.model_config or {}
        self.retriever = Retriever(
            context.artifacts["bundle"], backend=config.get("backend", "auto")
        )

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One recommendation per input row; see the module docstring for the columns."""
        out = []
        for row in model_input.to_dict(orient="records"):
            user = _cell(row, "user")
            k = _cell(row, "k")
            exclude = _cell(row, "exclude_seen")
            rec = self.retriever.query(
                None if user is None else str(user),
                k=DEFAULT_K if k is None else int(k),
                exclude_seen=True if exclude is None else bool(exclude),
                history=_history(_cell(row, "history")),
                attributes=_cell(row, "attributes"),
            )
            out.append(rec.to_dict())
        return pd.DataFrame(out, columns=["user", "items", "scores"], dtype=object)


mlflow.models.set_model(BundleModel())
