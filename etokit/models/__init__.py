"""Models built locally (no downloads): the tiny Llama agent used by tests and demos."""
