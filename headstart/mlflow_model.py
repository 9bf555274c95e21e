"""The MLflow pyfunc class of a registered headstart model: it loads the weights and answers through headstart.serving.

MLflow loads it "from code" (headstart/served_model.py names `HeadstartModel`): nothing is
unpickled. `load_context` rebuilds the network from the logged weights (safetensors, full
sha256 verified) and the `ModelSpec` inside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from headstart.checkpoints import load_model
from headstart.serving import answer, table


class HeadstartModel(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True
    """Requests take several forms (above): no type hints, and MLflow is told not to ask for them."""

    def load_context(self, context: Any) -> None:
        manifest = json.loads(Path(context.artifacts["manifest"]).read_text())
        self.net, self.spec = load_model(context.artifacts["weights"], manifest["sha256"])
        self.net.eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        try:
            probs = answer(self.net, self.spec, model_input)
        except ValueError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return table(self.spec, probs)
