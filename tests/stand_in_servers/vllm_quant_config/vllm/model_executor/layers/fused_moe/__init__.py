"""Stand-in of vLLM's ``override_config`` / ``get_config`` pair."""

from contextlib import contextmanager

_config = None


@contextmanager
def override_config(config):
    global _config
    previous, _config = _config, config
    try:
        yield
    finally:
        _config = previous


def get_config():
    return _config
