"""Fixtures of the registry source tests (defined in sourcekit.py)."""

from sourcekit import anon_registry, helper_path, proxy, token_registry

__all__ = ["anon_registry", "helper_path", "proxy", "token_registry"]
