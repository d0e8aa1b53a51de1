"""Fake OpenAI-compatible LLM for tests, benchmarks and the README demo (not a real LLM)."""

from fakellm.server import FakeLLM, serve

__all__ = ["FakeLLM", "serve"]
