"""Ray Data jobs: embedding extraction, corpus building, analysis. Each module runs as
``python -m pipelines.<module>`` and as a ``vlmlab`` verb."""
