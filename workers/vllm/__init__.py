"""Real vLLM replicas: the tiny local model builder and the launcher (see launch.py)."""
