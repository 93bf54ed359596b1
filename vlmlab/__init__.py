"""vlmlab: CLIP-family embedding, search, corpus building, fine-tuning and serving on Ray.

The core every other package imports: model loading (:mod:`vlmlab.models`), the embedding store
(:mod:`vlmlab.store`), images and tiles (:mod:`vlmlab.images`), prompts (:mod:`vlmlab.prompts`),
configs (:mod:`vlmlab.config`) and the command line (:mod:`vlmlab.cli`).
"""

__version__ = "0.1.0"
