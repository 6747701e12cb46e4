"""Training and evaluation loops for papscan's default models, and the default run."""
