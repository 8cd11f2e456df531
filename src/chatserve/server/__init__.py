"""The HTTP server: create_app() and its routes."""

from .app import create_app

__all__ = ["create_app"]
