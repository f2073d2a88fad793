"""cmim's HTTP service: FastAPI routes over the core (settings, database, artifact store, queue)."""
