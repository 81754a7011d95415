"""Helpers shared by the tests: private servers, brokers."""
