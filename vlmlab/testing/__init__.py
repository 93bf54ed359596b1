"""Builders of the offline stand-ins the demo and the tests run on: procedural sample data
(:mod:`vlmlab.testing.samples`) and the tiny CLIP model trained on it (:mod:`vlmlab.testing.tiny`).

They are reached from the command line as ``vlmlab samples`` and ``vlmlab tiny``; nothing in the
product's core imports them.
"""
