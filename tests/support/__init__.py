"""Shared test support: payload builders, stand-ins for the services the worker talks to, private servers."""
