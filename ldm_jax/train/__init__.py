"""Training: state, per-stage step factories, the shared loop and the `run` entry point."""
