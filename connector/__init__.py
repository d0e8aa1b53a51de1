"""The private side of remotellm: dials out to the broker and replays its requests on a local LLM."""

__version__ = "0.1.0"
