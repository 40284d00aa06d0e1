"""The stages of the pipeline, one module and one public stage function each.

Stages never import each other: the run directory is their only link (``pipeline.core``).
Which config sections each reads, its artifacts and its order: ``pipeline.core.stages``.
"""
