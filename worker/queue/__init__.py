"""The overnight queue: the Celery app and task, submitting, watching, cancelling, status."""
