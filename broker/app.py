"""``hypercorn broker.app:app``: the broker configured from the environment alone."""

import os

from broker.server import create_app
from broker.settings import resolve

app = create_app(resolve(None, os.environ), reload=lambda: resolve(None, os.environ))
