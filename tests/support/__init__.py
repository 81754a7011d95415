"""Shared test support: payload builders and stand-ins for the services the worker talks to."""
