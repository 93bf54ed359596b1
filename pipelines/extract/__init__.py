"""Embedding extraction with Ray Data: images -> CLIP embeddings -> the embedding store.

``vlmlab extract IMAGES --model SPEC --out STORE`` (or ``python -m pipelines.extract ...``, e.g.
under ``ray job submit --working-dir . --``) connects to the Ray cluster at ``--address`` /
``RAY_ADDRESS`` or starts an embedded local Ray.

How the work flows (nothing is materialised whole; each stage streams into the next):

1. The driver lists image files and compares them with the store: new paths are queued as they
   are; paths already stored are queued with their stored content hash, so a reader that finds
   the same bytes skips them without decoding (resume and incremental runs cost one read each).
2. Reader actors (CPU, on the nodes of their pool's GPU type) pull chunks of paths from a shared
   queue actor, read, hash, decode (``vlmlab.images.decode_image``: bad files become error rows,
   never exceptions) and preprocess with the model's own transform (``vlmlab.models.load_preprocess``,
   no weights needed) into blocks of about one encoder batch; pixels for GPU encoders travel as
   float16 (they compute in half precision), half the bytes of float32. By default every core a
   pool's nodes have beside its encoders runs a reader.
3. Encoder actors (``map_batches`` with a class: the model loads once per actor) embed the
   pixels on GPU when they hold one, else on CPU, and pass error rows through.
4. The driver writes each returned batch as one atomic store part, so a killed run loses at
   most the batches in flight, and records errors in ``errors.parquet``.

Heterogeneous GPUs: one reader+encoder pipeline **per GPU type** present in the cluster
(``titan_rtx``, ``a30``: custom resources declared by the nodes, see ``cluster/``), each pinned
to its type with ``resources={type: share}`` and sized from that type's profile
(``cluster/profiles.yaml``: batch size, dtype, GPU share). A Ray Data map stage has one
resource shape, so per-type batch sizes and dtypes need per-type stages; the pipelines share one
work queue, so a faster type simply pulls more chunks (dynamic balance, no static split that
leaves one card idle at the end). Readers start pulling once every pool's encoders have loaded
and each pool's readers stay a bounded number of images ahead of its encoders (``FlowGate``), so
no pool can drain the queue into its own buffers while another type idles. GPUs on nodes that
declare no type run one pipeline with the generic ``gpu`` profile (and a warning); a machine
without GPUs runs one ``cpu`` pipeline.

Precision follows the profile (``--dtype`` overrides it): fp16 on the Titan RTX (Turing has no
bf16), bf16 on the A30, and int8 dynamic quantisation of the image tower on CPU encoders, which on
a CPU with AVX-512 VNNI runs a ViT-B/32 about 1.7x faster than float32 at a cosine of about
0.9997 to the float32 embeddings. The summary reports throughput over the whole run and from the
moment every encoder has loaded its model (``steady_images_per_s``: what a long run sustains).

The package is the pipeline's parts, each readable and testable alone: :mod:`.config` (options
and the run summary), :mod:`.plan` (encoder pools per GPU type, the work list), :mod:`.gate`
(flow control), :mod:`.stages` (the reader and encoder actors), :mod:`.sink` (the store writer)
and :mod:`.job` (:func:`extract`, which composes them, and the command line).
"""

from pipelines.extract.config import ExtractConfig, ExtractSummary
from pipelines.extract.job import extract, main
from pipelines.extract.plan import PipelinePlan, plan_pipelines, plan_work, reader_count

__all__ = ["ExtractConfig", "ExtractSummary", "PipelinePlan", "extract", "main", "plan_pipelines", "plan_work",
           "reader_count"]
