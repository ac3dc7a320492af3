"""Architectures (built from their specs), checkpoints, and the teacher ensemble's identity and
combined outputs. Imports pipeline.core, format and inputs."""
