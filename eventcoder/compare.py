"""`eventcoder compare`: the runs of an experiment side by side, as a table in the terminal."""

from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from eventcoder.errors import TrackingError

# Params that differ between every pair of runs by construction and tell the reader nothing.
NOISE_PARAMS = ("train.output_dir", "train.checkpoint_dir", "tracking.run_name", "data.prepared_dir")


def _aliases_by_run(client: MlflowClient, model_name: str | None) -> dict[str, list[str]]:
    if not model_name:
        return {}
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException:
        return {}
    marks: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        run_id = client.get_model_version(model_name, version).run_id
        marks.setdefault(run_id, []).append(f"{alias} (v{version})")
    return marks


def differing_params(runs: list[Run]) -> list[str]:
    keys = sorted({key for run in runs for key in run.data.params} - set(NOISE_PARAMS))
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def compare_table(
    client: MlflowClient,
    experiment: str,
    sort_metric: str,
    metrics: list[str],
    model_name: str | None,
    max_runs: int = 50,
) -> tuple[list[str], list[list[Any]]]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"experiment {experiment!r} not found in {client.tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{sort_metric}` DESC", "attributes.start_time DESC"],
        max_results=max_runs,
    )
    params = differing_params(runs)
    marks = _aliases_by_run(client, model_name)
    header = ["run", "id", *params, *metrics, "registry"]
    rows = []
    for run in runs:
        values = [run.data.metrics.get(metric) for metric in metrics]
        rows.append(
            [
                run.info.run_name,
                run.info.run_id[:8],
                *(run.data.params.get(p, "") for p in params),
                *("" if v is None else f"{v:.4f}" for v in values),
                ", ".join(marks.get(run.info.run_id, [])),
            ]
        )
    return header, rows


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths, strict=True)),
        "  ".join("-" * width for width in widths),
    ]
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
