"""Tracking and release: MLflow runs, the model registry, the pyfunc model and the champion
gate. The only package that imports MLflow."""
