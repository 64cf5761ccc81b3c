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
        # Missing or blank text gets null labels (as `eventcoder predict` rejects such rows)
        # instead of a confident label for an empty string.
        codable = [i for i, text in enumerate(texts) if text is not None and text.strip()]
        coded = self.predictor.predict([texts[i] for i in codable], all_scores=all_scores)
        rows: list[dict[str, Any]] = [{} for _ in texts]
        for i, row in zip(codable, coded, strict=True):
            rows[i] = row
        columns = list(coded[0]) if coded else None
        return pd.DataFrame(rows, columns=columns)


def _texts(model_input: Any) -> list[str | None]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    return [value if isinstance(value, str) else None for value in values]


mlflow.models.set_model(EventcoderPyfunc())
