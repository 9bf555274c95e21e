"""What MLflow runs to load a registered headstart model ("models from code"): it names the class, nothing else.

`tracking.log_model` logs this file's path as the python model, so the model's files hold no
pickle; `HeadstartModel.load_context` then reads the weights (safetensors, sha256 verified).
"""

import mlflow.models

from headstart.mlflow_model import HeadstartModel

mlflow.models.set_model(HeadstartModel())
