"""Study jobs on Ray: a grid of (model x prompt style) cells, each one task on a model actor.

- :mod:`pipelines.studies.cells`   the shared runner: model actors, resume, progress, failures
- :mod:`pipelines.studies.colours` ``vlmlab study colours run``: colour-patch x concept score matrices
- :mod:`pipelines.studies.grid`    ``vlmlab study grid``: zero-shot classification over models x template sets
"""
