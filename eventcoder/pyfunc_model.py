"""The MLflow pyfunc wrapper: `predict` takes sentences, returns every task's label and score.

Logged as "model from code": MLflow stores this file and runs it at load time instead of
unpickling an object, so loading a registered model never executes pickled bytes.
"""

from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd


class EventcoderPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the model directory logged as the `model_dir` artifact."""

    def load_context(self, context) -> None:
        from eventcoder.inference import Predictor

        self.predictor = Predictor.load(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        texts = _texts(model_input)
        all_scores = bool((params or {}).get("all_scores", False))
        return pd.DataFrame(self.predictor.predict(texts, all_scores=all_scores))


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return ["" if v is None else str(v) for v in model_input[column].tolist()]
    if isinstance(model_input, pd.Series):
        return [str(v) for v in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


mlflow.models.set_model(EventcoderPyfunc())
