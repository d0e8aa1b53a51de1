"""``hypercorn broker.app:app``: the broker configured from the environment alone."""

import os

from broker import hypercorn_fixes
from broker.server import create_app
from broker.settings import resolve

app = hypercorn_fixes.install(create_app(resolve(None, os.environ), reload=lambda: resolve(None, os.environ)))
