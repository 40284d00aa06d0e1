"""Nearest-neighbour search: FAISS build / load / search (CPU or GPU), exact and index top-k
with exclusions, ANN tuning against exact search."""
