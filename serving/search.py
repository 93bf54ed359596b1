"""Search and zero-shot classification on Ray Serve: an encoder, an index and a FastAPI ingress.

Two parts do the work, in one of two layouts (``args.layout``):

- the encoder (:class:`QueryEncoderWork`) holds the CLIP model (``vlmlab.models.load_model``) and turns
  queries into vectors; every text/image forward pass goes through ``@serve.batch``, so concurrent
  requests share one forward pass (dynamic batching);
- the index (:class:`IndexReaderWork`) holds the store's FAISS index (``vlmlab.index.SearchIndex``)
  and answers nearest-neighbour, similar-image and thumbnail requests.

``combined`` (the default, and what ``vlmlab serve`` runs) keeps both inside the ``SearchAPI`` ingress
replica, which then takes the encoder deployment's resources and scaling from the config: a request
makes one hop (proxy -> replica), which on one machine costs far less than the two extra deployment
calls it saves. ``split`` (serving/config.yaml, the RayService) runs them as their own deployments
(``QueryEncoder`` on a fractional GPU, ``IndexReader`` on CPU) for a cluster where the encoder sits on
a GPU node and scales apart from the index; the ingress then retries a call whose replica died, so
losing one costs few requests.

``SearchAPI`` is the HTTP front (``@serve.ingress``): validation (bounded text, classes, filters and
uploads; unknown JSON fields refused), 4xx answers with a reason, the web page in ``serving/static/``
and the OpenAPI docs at ``/docs``. ``POST /classify`` is zero-shot over the classes a request names, or,
without classes, the app's probe (``args.probe``, :mod:`vlmlab.probe`): calibrated probabilities and,
with ``conformal=ALPHA``, a prediction set.

``serve run serving/config.yaml`` or ``vlmlab serve STORE`` starts it; ``build_app(args)`` is the
app builder both use. Nothing heavy happens at import time. (No ``from __future__ import annotations``
here: FastAPI must see the real request-body types of the ingress methods.)
"""

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serving.common import (
    InProcess,
    Unavailable,
    app_parser,
    call,
    call_retrying,
    decode_base64_image,
    decode_upload,
    install_error_handlers,
    install_request_limits,
    options_of,
    public_message,
    run_app,
)
from vlmlab.config import build_config
from vlmlab.encoder import Encoder

log = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
APP_NAME = "search"
LAYOUTS = ("combined", "split")


@dataclass(frozen=True)
class SearchAppArgs:
    """Arguments of the search application (the ``args:`` block of its entry in config.yaml)."""

    store: str = field(default="", metadata={"help": "embedding store directory (with index/ built by `vlmlab index`)"})
    model: str = field(default="", metadata={"help": "model spec for queries; empty: the store manifest's model"})
    layout: str = field(default="combined", metadata={
        "help": "combined: encoder and index inside the ingress replica (one hop) | split: their own deployments "
                "(a GPU encoder on a cluster)"})
    device: str = field(default="", metadata={"help": "encoder torch device; empty: CUDA if the replica has one"})
    max_batch_size: int = field(default=16, metadata={"help": "most queries per encoder forward pass; 1: no batching"})
    batch_wait_timeout_s: float = field(default=0.005, metadata={"help": "longest wait for a batch to fill"})
    max_k: int = field(default=100, metadata={"help": "largest k a request may ask for"})
    max_upload_bytes: int = field(default=5 * 1024**2, metadata={"help": "largest image upload accepted (bytes)"})
    max_text_chars: int = field(default=1000, metadata={"help": "longest text, negative phrase or class name"})
    max_classes: int = field(default=64, metadata={"help": "most classes (and negative phrases) a request may name"})
    body_timeout_s: float = field(default=15.0, metadata={
        "help": "longest a client may take to send its request body (slow senders get 408)"})
    thumb_size: int = field(default=128, metadata={"help": "longest side of /thumb images (pixels)"})
    templates: str = field(default="plain", metadata={"help": "prompt template set for text queries and classes"})
    probe: str = field(default="", metadata={"help": "probe directory (vlmlab train probe): /classify without classes "
                                                      "uses it, calibrated, with prediction sets"})

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")


# --------------------------------------------------------------------------- the two parts


class QueryEncoderWork:
    """Turns search queries and class names into L2-normalised vectors, batching forward passes."""

    def __init__(self, model: str, device: str = "", max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
                 probe: str = ""):
        from vlmlab.models import load_model

        self.encoder = load_model(model, device=device or None)
        self.probe, self.probe_error = None, ""
        if probe:
            try:  # a bad probe is reported on use (503 with the reason), never a crash loop
                from vlmlab.probe import check_probe_model, load_probe

                self.probe = load_probe(probe)
                check_probe_model(self.probe, model)  # the app encodes queries without an adapter
            except Exception as exc:
                self.probe, self.probe_error = None, f"could not load probe {probe!r}: {type(exc).__name__}: {exc}"
                log.error(self.probe_error)
        # forward passes run on a thread of their own: the replica's loop keeps accepting (and batching)
        # requests meanwhile, and library calls waiting in the default pool never starve the model
        self._forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._encode_text_lists.set_max_batch_size(max_batch_size)
        self._encode_text_lists.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._encode_image_lists.set_max_batch_size(max_batch_size)
        self._encode_image_lists.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = self.batched_queries = self.max_batch = 0  # counters, not a list: replicas run for weeks

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_text_lists(self, text_lists: list[list[str]]) -> list[np.ndarray]:
        # Each request brings its own list (a prompt ensemble); one forward pass encodes them all.
        self.batches += 1
        self.batched_queries += len(text_lists)
        self.max_batch = max(self.max_batch, len(text_lists))
        flat = [t for texts in text_lists for t in texts]
        vectors = await asyncio.get_running_loop().run_in_executor(self._forward, self.encoder.encode_texts, flat)
        bounds = np.cumsum([0] + [len(t) for t in text_lists])
        return [vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_image_lists(self, image_lists: list[list[Image.Image]]) -> list[np.ndarray]:
        flat = [im for images in image_lists for im in images]
        vectors = await asyncio.get_running_loop().run_in_executor(self._forward, self.encoder.encode_images, flat)
        bounds = np.cumsum([0] + [len(i) for i in image_lists])
        return [vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _batched_encoder(self) -> "BatchedEncoder":
        return BatchedEncoder(self.encoder, asyncio.get_running_loop(), self._encode_text_lists,
                              self._encode_image_lists)

    async def query_vector(self, query: Any) -> np.ndarray:
        """The (D,) vector of a ``vlmlab.search.Query``; raises ValueError for an empty query."""
        from vlmlab.search import query_vector

        # The library function is synchronous; in a thread, its encode calls join the batch queues.
        return await asyncio.to_thread(query_vector, self._batched_encoder(), query)

    async def classify(self, image: Image.Image, classes: list[str], templates: str | list[str]) -> list[float]:
        """Zero-shot probabilities of ``image`` over ``classes`` (sum to 1)."""
        from vlmlab.classify import class_embeddings, zero_shot_probs

        batched = self._batched_encoder()
        class_vectors = await asyncio.to_thread(class_embeddings, batched, classes, templates)
        image_vector = await self._encode_image_lists([image])
        probs = zero_shot_probs(image_vector, class_vectors, self.encoder.logit_scale)
        return [float(p) for p in probs[0]]

    async def classify_probe(self, image: Image.Image, alpha: float | None = None,
                             method: str | None = None) -> dict[str, Any]:
        """The probe's (calibrated) probabilities of ``image`` and, with ``alpha``, its prediction set and
        the guarantee it carries. ``Unavailable`` without a probe; ``ValueError`` for a bad alpha."""
        if self.probe is None and not self.probe_error:  # the request's fault: it named no classes
            raise ValueError("give at least two comma-separated class names (this app has no probe: start it "
                             "with probe=DIR of `vlmlab train probe` to classify without them)")
        if self.probe is None:
            raise Unavailable(self.probe_error)
        vector = await self._encode_image_lists([image])
        probs = self.probe.predict_proba(vector)
        out: dict[str, Any] = {"classes": list(self.probe.classes), "probs": [float(p) for p in probs[0]],
                               "probe": {"method": self.probe.method, "shots": self.probe.shots,
                                         "calibrated": self.probe.calibration is not None}}
        if alpha is not None:
            if self.probe.calibration is None:
                raise ValueError("the app's probe is not calibrated, so it has no prediction sets")
            members = self.probe.calibration.sets(probs, alpha, method)[0]
            order = np.argsort(-probs[0], kind="stable")
            out["prediction_set"] = [self.probe.classes[j] for j in order if members[j]]
            out["conformal"] = self.probe.calibration.guarantee(alpha, method)
        return out

    def stats(self) -> dict[str, Any]:
        """Text batches seen by this encoder (to check that batching happens)."""
        return {"batches": self.batches, "max_batch": self.max_batch,
                "mean_batch": self.batched_queries / self.batches if self.batches else 0.0}


class BatchedEncoder:
    """An :class:`~vlmlab.encoder.EncoderLike` for library code running in a worker thread of a replica:
    ``encode_texts``/``encode_images`` go through the replica's ``@serve.batch`` queues, so the
    library's prompt and query logic runs unchanged while forward passes are shared."""

    def __init__(self, encoder: Encoder, loop: asyncio.AbstractEventLoop, encode_text_lists: Any,
                 encode_image_lists: Any):
        self._encoder = encoder
        self._loop = loop
        self._texts = encode_text_lists
        self._images = encode_image_lists
        self.spec = encoder.spec
        self.embed_dim = encoder.embed_dim

    @property
    def logit_scale(self) -> float:
        """The real encoder's logit scale."""
        return self._encoder.logit_scale

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised (N, D) text embeddings, computed in the replica's shared batch."""
        if not texts:
            return np.zeros((0, self._encoder.embed_dim), np.float32)
        return asyncio.run_coroutine_threadsafe(self._texts(list(texts)), self._loop).result()

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """L2-normalised (N, D) image embeddings, computed in the replica's shared batch."""
        if not len(images):
            return np.zeros((0, self._encoder.embed_dim), np.float32)
        return asyncio.run_coroutine_threadsafe(self._images(list(images)), self._loop).result()


class IndexReaderWork:
    """The store's FAISS index on CPU. A store or index that fails to load is logged and reported
    by ``health()`` (so ``/healthz`` fails with the reason) instead of crashing the replica."""

    def __init__(self, store: str, thumb_size: int = 128):
        from vlmlab.index import SearchIndex
        from vlmlab.store import EmbeddingStore

        self.index = None
        self.error = ""
        self.thumb_size = thumb_size
        try:
            if not store:
                raise Unavailable("no store given: set args.store in the Serve config or run `vlmlab serve STORE`")
            self.index = SearchIndex.load(EmbeddingStore.open(store))
            log.info("index of %s loaded: %d vectors", store, len(self.index))
        except Exception as exc:  # reported through /healthz, never a crash loop
            self.error = f"could not load store/index {store!r}: {type(exc).__name__}: {exc}"
            log.error(self.error)

    def _loaded(self):
        if self.index is None:
            raise Unavailable(self.error)
        return self.index

    def health(self) -> dict[str, Any]:
        """{"ok", "reason", "vectors", "model"} of this index."""
        if self.index is None:
            return {"ok": False, "reason": self.error}
        return {"ok": True, "vectors": len(self.index), "model": self.index.model, "embed_dim": self.index.embed_dim}

    def search(self, vector: np.ndarray, k: int, where: str | None) -> list[dict[str, Any]]:
        """Top-k hits (as dicts) for one (D,) query vector."""
        hits = self._loaded().search(np.asarray(vector, np.float32)[None, :], k, where=where)[0]
        return [h.as_dict() for h in hits]

    def similar(self, image_id: int, k: int, where: str | None) -> list[dict[str, Any]]:
        """Top-k images most like store image ``image_id`` (itself excluded); KeyError if unknown."""
        from vlmlab.search import similar

        index = self._loaded()
        index.vector(image_id)  # KeyError (-> 404) for an unknown id, whatever the search does with it
        return [h.as_dict() for h in similar(index, image_id, k, where=where)]

    def thumbnail(self, image_id: int) -> bytes:
        """PNG thumbnail (longest side ``thumb_size``) of store image ``image_id``; KeyError if unknown."""
        index = self._loaded()
        index.vector(image_id)  # KeyError (-> 404) for an unknown id
        return _thumbnail_png(str(index.path_of(image_id)), self.thumb_size)


@lru_cache(maxsize=4096)
def _thumbnail_png(path: str, size: int) -> bytes:
    from vlmlab.images import read_image

    image = read_image(path)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# The split layout's deployments: the same classes, each its own replica set. No GPU by default, so
# `serve run serving.search:build_app store=... layout=split` also runs on a CPU-only machine; the
# config gives the encoder a GPU share (dropped where the cluster has none).
QueryEncoder = serve.deployment(name="QueryEncoder", ray_actor_options={"num_cpus": 1})(QueryEncoderWork)
IndexReader = serve.deployment(name="IndexReader", ray_actor_options={"num_cpus": 0.5})(IndexReaderWork)


# --------------------------------------------------------------------------- HTTP


class SearchRequest(BaseModel):
    """Body of ``POST /search``: text and/or a base64 image, with optional negative terms."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field ("txt") is a 422, not an empty query

    text: str | None = Field(default=None, description="what to find, e.g. 'layered sandstone'")
    image: str | None = Field(default=None, description="base64 image (PNG/JPEG/TIFF) to search similar to")
    negative: str | list[str] | None = Field(default=None, description="text to steer away from")
    weights: tuple[float, float, float] = Field(default=(1.0, 1.0, 0.5), description="(text, image, negative) weights")
    k: int = Field(default=12, description="number of hits")
    source: str | None = Field(default=None, description="only hits whose source is this (real, synthetic)")
    where: str | None = Field(default=None, description="metadata filter, e.g. \"source = 'real' and tile_z = 3\"")
    templates: str | list[str] | None = Field(default=None, description="prompt template set(s); default: the app's")


app = FastAPI(title="vlmlab search",
              description="Text/image search and zero-shot classification over an embedding store.")
install_error_handlers(app)  # before @serve.ingress(app): Serve takes the app's handlers then
install_request_limits(app)  # slow senders cut off after app.state.body_timeout_s (set per replica)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class SearchAPI:
    """HTTP front: validates requests, calls the encoder and the index (in this replica or their own
    deployments), serves the page."""

    def __init__(self, encoder: Any, index: Any, args: dict[str, Any]):
        self.cfg = cfg = build_config(SearchAppArgs, args)
        app.state.body_timeout_s = cfg.body_timeout_s
        # combined layout: the parts live here and are called like handles (one hop per request)
        self.encoder = encoder if encoder is not None else InProcess(QueryEncoderWork(
            cfg.model, cfg.device, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.probe))
        self.index = index if index is not None else InProcess(IndexReaderWork(cfg.store, cfg.thumb_size))

    # ---------------------------------------------------------------- helpers

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.cfg.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.cfg.max_k}, got {k}")

    def _check_texts(self, what: str, texts: Sequence[str]) -> None:
        if len(texts) > self.cfg.max_classes:
            raise HTTPException(400, f"{len(texts)} {what}; the limit is {self.cfg.max_classes}")
        long = [t for t in texts if len(t) > self.cfg.max_text_chars]
        if long:
            raise HTTPException(400, f"a {what[:-1] if what.endswith('s') else what} of {len(long[0])} characters; "
                                     f"the limit is {self.cfg.max_text_chars}")

    @staticmethod
    def _where(source: str | None, where: str | None) -> str | None:
        """The request's filter as one expression, checked here (a bad one is a 400 before any hop)."""
        from vlmlab.filters import FilterError, parse_where
        from vlmlab.store import store_schema

        clauses = []
        if source:
            if source not in ("real", "synthetic"):
                raise HTTPException(400, f"source must be 'real' or 'synthetic', got {source!r}")
            clauses.append(f"source = '{source}'")
        if where:
            try:
                parse_where(where, store_schema(1))  # every store has these metadata columns
            except FilterError as exc:
                raise HTTPException(400, str(exc)) from exc
            clauses.append(f"({where})")
        return " and ".join(clauses) or None

    @staticmethod
    def _with_thumbs(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # URLs are built here: ids are int64 and lose precision as JavaScript numbers.
        return [{**h, "thumb_url": f"thumb/{h['id']}", "similar_url": f"similar/{h['id']}"} for h in hits]

    # ---------------------------------------------------------------- routes

    @app.get("/", include_in_schema=False)
    def page(self) -> FileResponse:
        """The search web page."""
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(self, name: str) -> FileResponse:
        """The page's script and style sheet (a mounted StaticFiles app is not routed by Serve)."""
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when the index is loaded; 503 with the reason otherwise."""
        health = await call_retrying(lambda: self.index.health.remote())
        if health.get("reason"):
            health["reason"] = public_message(health["reason"])
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    @app.post("/search")
    async def search(self, body: SearchRequest) -> dict[str, Any]:
        """Hits for a text and/or image query (with optional negative text), best first."""
        from vlmlab.search import Query

        started = time.perf_counter()
        self._check_k(body.k)
        text = (body.text or "").strip()
        negatives = [body.negative] if isinstance(body.negative, str) else list(body.negative or [])
        templates = [body.templates] if isinstance(body.templates, str) else list(body.templates or [])
        self._check_texts("texts", [text, *negatives, *templates])
        if not text and not body.image:
            raise HTTPException(400, "empty query: give text and/or an image")
        image = decode_base64_image(body.image, self.cfg.max_upload_bytes) if body.image else None
        where = self._where(body.source, body.where)
        query = Query(text=text or None, image=image, negative=body.negative or None, weights=tuple(body.weights),
                      k=body.k, where=where, templates=body.templates or self.cfg.templates)
        vector = await call_retrying(lambda: self.encoder.query_vector.remote(query))
        hits = await call_retrying(lambda: self.index.search.remote(vector, body.k, where))
        return {"hits": self._with_thumbs(hits), "took_ms": round(1000 * (time.perf_counter() - started), 2)}

    @app.get("/similar/{image_id}")
    async def similar(self, image_id: int, k: int = 12, source: str | None = None,
                      where: str | None = None) -> dict[str, Any]:
        """Store images most like image ``image_id`` (itself excluded)."""
        self._check_k(k)
        where = self._where(source, where)
        hits = await call_retrying(lambda: self.index.similar.remote(image_id, k, where))
        return {"hits": self._with_thumbs(hits)}

    @app.post("/classify")
    async def classify(self, image: UploadFile = File(..., description="the image to classify"),
                       classes: str | None = Form(default=None, description="class names, comma-separated; "
                                                  "omitted: the app's probe (calibrated, with prediction sets)"),
                       templates: str | None = Form(default=None, description="prompt template set"),
                       conformal: float | None = Form(default=None, description="alpha in (0, 1): add the probe's "
                                                      "prediction_set, holding the true class with prob >= 1-alpha"),
                       conformal_method: str | None = Form(default=None, description="lac | aps | raps")
                       ) -> dict[str, Any]:
        """Class probabilities of an uploaded image: zero-shot over ``classes``, or the app's probe."""
        from vlmlab.calibration import check_alpha, check_method

        try:
            alpha = None if conformal is None else check_alpha(conformal)
            method = None if conformal_method is None else check_method(conformal_method)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        names = [c.strip() for c in (classes or "").split(",") if c.strip()]
        self._check_texts("classes", names + ([templates] if templates else []))
        if classes is not None and len(names) < 2:
            raise HTTPException(400, "give at least two comma-separated class names (or none, for the app's probe)")
        if len(set(names)) != len(names):
            raise HTTPException(400, "class names must be distinct")
        if names and alpha is not None:
            raise HTTPException(400, "prediction sets come from the app's calibrated probe: omit classes "
                                     "(zero-shot over ad-hoc classes has no calibration)")
        data = await image.read(self.cfg.max_upload_bytes + 1)
        picture = decode_upload(data, self.cfg.max_upload_bytes)
        if names:
            chosen = templates or self.cfg.templates
            probs = await call_retrying(lambda: self.encoder.classify.remote(picture, names, chosen))
            body: dict[str, Any] = {"classes": names, "probs": probs}
        else:
            body = await call_retrying(lambda: self.encoder.classify_probe.remote(picture, alpha, method))
        ranked = sorted(zip(body["classes"], body["probs"]), key=lambda kv: -kv[1])
        return {**body, "top": ranked[0][0], "ranked": [{"class": c, "prob": p} for c, p in ranked]}

    @app.get("/thumb/{image_id}")
    async def thumb(self, image_id: int) -> Response:
        """PNG thumbnail of a store image."""
        png = await call_retrying(lambda: self.index.thumbnail.remote(image_id))
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/stats", include_in_schema=False)
    async def stats(self) -> dict[str, Any]:
        """Batching figures of one encoder."""
        return await call(self.encoder.stats.remote())


def build_app(args: dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The search application for ``serve run`` / config files; ``args`` fill :class:`SearchAppArgs`,
    ``deployments`` (a config's per-deployment options by name) are applied when given.

    The model defaults to the store manifest's. A missing/bad store still builds an app whose
    ``/healthz`` answers 503 with the reason (so a deploy never hangs on it).
    """
    cfg = build_config(SearchAppArgs, args)
    model = cfg.model
    if not model and cfg.store:
        from vlmlab.store import EmbeddingStore

        try:
            model = EmbeddingStore.open(cfg.store).model
        except Exception as exc:  # the index reports the same problem on /healthz
            log.error("cannot read the model spec from store %r: %s", cfg.store, exc)
    if not model:
        raise ValueError(f"no model spec: store {cfg.store!r} has no readable manifest and args.model is empty; "
                         "set args.store of the search app in serving/config.yaml or run `vlmlab serve STORE`")
    probe = str(Path(cfg.probe).expanduser().resolve()) if cfg.probe else ""
    cfg = build_config(SearchAppArgs, {**asdict(cfg), "model": model, "probe": probe})
    if cfg.layout == "split":
        encoder = QueryEncoder.options(**options_of(deployments, "QueryEncoder")).bind(
            model, cfg.device, cfg.max_batch_size, cfg.batch_wait_timeout_s, probe)
        index = IndexReader.options(**options_of(deployments, "IndexReader")).bind(cfg.store, cfg.thumb_size)
        return SearchAPI.options(**options_of(deployments, "SearchAPI")).bind(encoder, index, asdict(cfg))
    # combined: the ingress holds the model, so it takes the encoder's resources and scaling (a config
    # written for the split layout serves both)
    options = options_of(deployments, "SearchAPI")
    encoder_options = options_of(deployments, "QueryEncoder")
    for key in ("ray_actor_options", "autoscaling_config", "num_replicas"):
        if key in encoder_options:
            options[key] = encoder_options[key]
    return SearchAPI.options(**options).bind(None, None, asdict(cfg))


def main(argv: list[str] | None = None) -> None:
    """``vlmlab serve STORE [--port 8000] [--config serving/config.yaml] [key=value ...]``."""
    store = {"store_dir": {"metavar": "STORE", "help": "embedding store to search (its index/ built)"}}
    args = app_parser("vlmlab serve", __doc__.split("\n")[0], SearchAppArgs, store, skip=("store",)).parse_args(argv)
    # one machine: one hop (the config file's layout is a cluster's); a --layout flag or override wins
    layout = {} if args.layout or any(o.startswith("layout=") for o in args.overrides) else {"layout": "combined"}
    run_app(args, APP_NAME, SearchAppArgs, "/", {"store": str(Path(args.store_dir).resolve()), **layout})


if __name__ == "__main__":
    main()
