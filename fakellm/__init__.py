"""Fake LLM server speaking OpenAI, Responses, Anthropic and Ollama APIs, for tests, benchmarks and the demo."""

from fakellm.server import FakeLLM, serve

__all__ = ["FakeLLM", "serve"]
