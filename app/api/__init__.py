"""The HTTP API: dependencies, schemas, routes."""
