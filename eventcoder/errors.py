"""Errors that reach the user as one line naming the file, row, column or key at fault."""


class EventcoderError(Exception):
    """Base class: the CLI prints these as a single line and exits non-zero."""


class ConfigError(EventcoderError):
    """A configuration file or override is invalid."""


class SchemaError(EventcoderError):
    """A label schema file is invalid."""


class DataError(EventcoderError):
    """An input data file cannot be used at all (missing file, missing column, bad format)."""


class TrackingError(EventcoderError):
    """The MLflow tracking server or registry cannot be used."""


class WorkerError(EventcoderError):
    """A prediction worker process died (killed, out of memory); finished chunks are kept."""
