"""Tools over caches: list and inspect them, measure an encoding's fidelity against the full
teacher outputs, and import served log-probs (vLLM, OpenAI-style) as a token cache."""
