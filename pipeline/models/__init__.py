"""Architectures, one module each (mlp, cnn, imported, gpt, hf) and their table in builders.py,
checkpoints, and the teacher ensemble's identity and combined outputs. Imports pipeline.core,
format and inputs."""
