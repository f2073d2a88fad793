"""Settings, database, artifact store and queue helpers shared by the API and the worker."""
