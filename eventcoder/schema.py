"""The label schema: tasks, their label ids and derived (parent) tasks.

Label ids are positions in the schema file. They are never inferred from a data file,
because a class missing from one file would shift every id after it.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from eventcoder.errors import SchemaError
from eventcoder.yaml_io import load_yaml

NO_LABEL = "none"


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["single_label", "multi_label"] = "single_label"
    labels: tuple[str, ...] = Field(min_length=2)
    # Multi-label only: one threshold for all labels, or one per label.
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    thresholds: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "Task":
        duplicates = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"task {self.name!r}: duplicate labels {duplicates}")
        unknown = sorted(set(self.thresholds) - set(self.labels))
        if unknown:
            raise ValueError(f"task {self.name!r}: thresholds for unknown labels {unknown}")
        if self.thresholds and self.kind != "multi_label":
            raise ValueError(f"task {self.name!r}: thresholds only apply to multi_label tasks")
        return self

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def label_id(self, label: str) -> int:
        return self.labels.index(label)

    def threshold_for(self, label: str) -> float:
        return self.thresholds.get(label, self.threshold)


class DerivedTask(BaseModel):
    """A task whose label is a function of another task's label (e.g. event_type of sub_event_type)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    source: str = Field(alias="from")
    mapping: dict[str, str]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.mapping.values()))


class LabelSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    main_task: str
    tasks: tuple[Task, ...] = Field(min_length=1)
    derived: tuple[DerivedTask, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> "LabelSchema":
        names = [task.name for task in self.tasks] + [task.name for task in self.derived]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if self.main_task not in {task.name for task in self.tasks}:
            raise ValueError(f"main_task {self.main_task!r} is not one of the tasks")
        for derived in self.derived:
            if derived.source not in {task.name for task in self.tasks}:
                raise ValueError(f"derived task {derived.name!r}: source {derived.source!r} is not a task")
            source = self.task(derived.source)
            if source.kind != "single_label":
                raise ValueError(f"derived task {derived.name!r}: source {derived.source!r} must be single_label")
            missing = [label for label in source.labels if label not in derived.mapping]
            extra = sorted(set(derived.mapping) - set(source.labels))
            if missing or extra:
                raise ValueError(
                    f"derived task {derived.name!r}: mapping must cover exactly the labels of "
                    f"{derived.source!r} (missing {missing}, unknown {extra})"
                )
        return self

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def load_schema(path: str | Path) -> LabelSchema:
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: a schema must be a mapping with 'name', 'main_task', 'tasks'")
    return schema_from_dict(raw, source=str(path))


def schema_from_dict(raw: dict[str, Any], source: str = "<schema>") -> LabelSchema:
    try:
        return LabelSchema.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        raise SchemaError(f"{source}: {key}: {error['msg']}") from None
