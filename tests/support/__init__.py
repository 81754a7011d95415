"""Shared test support: the run's environment, factories, checks, stand-ins for the services the worker
talks to (Stripe's API, HTTP servers), real worker processes and private servers.

Importing any of it sets this run's environment first (support.run), before anything of `worker` reads its
settings: every test module and conftest imports support before worker.
"""

from support import run as run
