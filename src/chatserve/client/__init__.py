"""Clients of the server: the /infer demo client."""
