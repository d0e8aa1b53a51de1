"""The public side of remotellm: an OpenAI-compatible API routed onto connector tunnels."""

__version__ = "0.1.0"
