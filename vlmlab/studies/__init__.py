"""Studies: grids of (model x prompt style) cells scored by a Ray job, then analysed from the files.

- :mod:`vlmlab.studies.styles`      prompt styles and concept lists of the colour-concept study
- :mod:`vlmlab.studies.scores`      score matrices: computing them from a model, reading and writing the CSVs
- :mod:`vlmlab.studies.association` model-vs-human association metrics per concept
- :mod:`vlmlab.studies.discriminability` semantic discriminability (ΔS) and the capacity of a concept set
- :mod:`vlmlab.studies.analyze`     ``vlmlab study colours analyze``: metrics, figures, ``report.html``

The Ray jobs that compute the cells live in ``pipelines/studies/``.
"""
