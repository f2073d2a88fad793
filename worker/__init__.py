"""The job pipeline: Celery app and tasks, the embedded local worker, and the composing CLI."""
