"""t5lite's config files, installed as the package t5lite.configs (see setup.py)."""
