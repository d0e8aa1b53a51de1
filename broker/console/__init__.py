"""The admin web console at /admin: live connectors, models, usage charts, a request feed, enrollment."""

from broker.console.pages import routes

__all__ = ["routes"]
