"""eventcoder: fine-tune transformers to code conflict news by event type and actor."""

__version__ = "0.1.0"
