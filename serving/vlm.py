"""A VLM on Ray Serve: ``POST /vlm/ask`` answers a prompt or judges a statement about one or two images.

Two deployments (the ``vlm`` application of config.yaml):

- ``VLMAnswerer`` holds the model (``vlmlab.backends.qwen2_vl.load_vlm``, optionally with a LoRA
  adapter) on a fractional GPU. Statement scoring goes through ``@serve.batch``, so concurrent
  statements share one forward pass; generation batches requests with the same decoding knobs.
- ``VLMAPI`` is the FastAPI ingress: validation (4xx ``{"error": reason}``), ``GET /healthz``
  (503 with the reason when the model did not load).

Body of ``POST /vlm/ask`` (JSON): ``images`` (one or two base64 images, left first), and either
``statement`` (answer "True"/"False" with ``p_true``, from the logits of "True" and "False" at the
answer position, as ``vlmlab vlm eval`` scores) or ``prompt`` (free answer), plus decoding knobs
``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``num_beams``.

``serve run serving/config.yaml`` or ``vlmlab vlm serve --model SPEC [--adapter DIR]`` starts it;
``build_app(args)`` is the builder both use. (No ``from __future__ import annotations``: FastAPI must
see the real request-body types.)
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.common import (
    Unavailable,
    app_parser,
    call,
    decode_base64_image,
    install_error_handlers,
    install_request_limits,
    options_of,
    public_message,
    run_app,
)
from vlmlab.config import build_config

log = logging.getLogger("ray.serve")

APP_NAME = "vlm"
MAX_IMAGES = 2


@dataclass(frozen=True)
class VlmAppArgs:
    """Arguments of the vlm application (the ``args:`` block of its entry in config.yaml)."""

    model: str = field(default="", metadata={"help": "VLM spec: hub id, hf:ID or local directory"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory (vlmlab vlm train)"})
    device: str = field(default="", metadata={"help": "torch device; empty: CUDA if the replica has one"})
    prompt_template: str = field(default="", metadata={"help": "statement prompt template file; default the lab's"})
    max_batch_size: int = field(default=8, metadata={"help": "most requests per forward pass; 1: no batching"})
    batch_wait_timeout_s: float = field(default=0.01, metadata={"help": "longest wait for a batch to fill"})
    max_new_tokens_limit: int = field(default=128, metadata={"help": "largest max_new_tokens a request may ask"})
    max_upload_bytes: int = field(default=5 * 1024**2, metadata={"help": "largest image accepted (decoded bytes)"})


class AskRequest(BaseModel):
    """Body of ``POST /vlm/ask``."""

    images: list[str] = Field(..., description="one or two base64 images (PNG/JPEG), left first")
    statement: str | None = Field(default=None, description="a statement to judge: answer True/False with p_true")
    prompt: str | None = Field(default=None, description="a free prompt to answer (instead of a statement)")
    max_new_tokens: int = Field(default=16, description="tokens to decode")
    temperature: float = Field(default=0.0, description="0: greedy (or beam) decoding; > 0 samples")
    top_p: float = Field(default=1.0, description="nucleus sampling mass (temperature > 0)")
    top_k: int = Field(default=50, description="top-k sampling (temperature > 0)")
    num_beams: int = Field(default=1, description="beam search width (temperature 0)")


# No GPU by default, so `serve run serving.vlm:build_app model=...` also runs on a CPU-only machine;
# serving/config.yaml asks for a fraction of a GPU (dropped where the cluster has none).
@serve.deployment(ray_actor_options={"num_cpus": 1})
class VLMAnswerer:
    """The VLM; statements of concurrent requests share one forward pass (``@serve.batch``)."""

    def __init__(self, model: str, adapter: str = "", device: str = "", prompt_template: str = "",
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        from vlmlab.nlvr import DEFAULT_PROMPT, check_prompt_template

        self.vlm, self.error = None, ""
        self.prompt = DEFAULT_PROMPT
        try:
            if not model:
                raise Unavailable("no model: set args.model of the vlm app or pass --model")
            if prompt_template:
                self.prompt = check_prompt_template(Path(prompt_template).read_text())
            from vlmlab.backends.qwen2_vl import load_vlm

            self.vlm = load_vlm(model, adapter=adapter or None, device=device or None)
            log.info("VLM %s%s loaded on %s", model, f" + {adapter}" if adapter else "", self.vlm.device)
        except Exception as exc:  # reported through /healthz and 503s, never a crash loop
            self.error = f"could not load VLM {model!r}: {type(exc).__name__}: {exc}"
            log.error(self.error)
        self.spec, self.adapter = model, adapter or None
        self._score.set_max_batch_size(max_batch_size)
        self._score.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._answer.set_max_batch_size(max_batch_size)
        self._answer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = self.batched = self.max_batch = 0

    def _loaded(self) -> Any:
        if self.vlm is None:
            raise Unavailable(self.error)
        return self.vlm

    def health(self) -> dict[str, Any]:
        """{"ok", "reason", "model", "adapter", "device"} of this replica."""
        if self.vlm is None:
            return {"ok": False, "reason": self.error, "model": self.spec}
        return {"ok": True, "reason": "", "model": self.spec, "adapter": self.adapter, "device": str(self.vlm.device)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score(self, items: list[tuple[str, list[Image.Image]]]) -> list[float]:
        vlm = self._loaded()
        self.batches += 1
        self.batched += len(items)
        self.max_batch = max(self.max_batch, len(items))
        from vlmlab.nlvr import format_prompt

        prompts = [format_prompt(self.prompt, s) for s, _ in items]
        # the forward pass runs in a thread so the replica keeps collecting the next batch meanwhile
        p_true = await asyncio.to_thread(vlm.p_true, prompts, [ims for _, ims in items], len(items))
        return [float(p) for p in p_true]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _answer(self, items: list[tuple[str, list[Image.Image], tuple]]) -> list[str]:
        vlm = self._loaded()
        # one generate call per distinct set of decoding knobs in the batch
        out: list[str | None] = [None] * len(items)
        for knobs in dict.fromkeys(k for _, _, k in items):
            idx = [i for i, item in enumerate(items) if item[2] == knobs]
            answers = await asyncio.to_thread(vlm.generate, [items[i][0] for i in idx], [items[i][1] for i in idx],
                                              *knobs, batch_size=len(idx))
            for i, a in zip(idx, answers):
                out[i] = a
        return out

    async def judge(self, statement: str, images: list[Image.Image]) -> dict[str, Any]:
        """{"answer", "p_true", "prompt"} for a statement, scored like ``vlmlab vlm eval`` (logits mode)."""
        from vlmlab.nlvr import format_prompt

        p_true = await self._score((statement, images))
        return {"answer": "True" if p_true >= 0.5 else "False", "p_true": p_true,
                "prompt": format_prompt(self.prompt, statement)}

    async def ask(self, prompt: str, images: list[Image.Image], knobs: tuple) -> dict[str, Any]:
        """{"answer"} for a free prompt decoded with ``knobs`` (max_new_tokens, temperature, top_p, top_k, beams)."""
        return {"answer": await self._answer((prompt, images, knobs))}

    def stats(self) -> dict[str, Any]:
        """Statement batches seen by this replica (to check that batching happens)."""
        return {"batches": self.batches, "max_batch": self.max_batch,
                "mean_batch": self.batched / self.batches if self.batches else 0.0}


app = FastAPI(title="vlmlab vlm", description="Ask a vision-language model about one or two images.")


install_error_handlers(app)  # before @serve.ingress(app): Serve takes the app's handlers then
install_request_limits(app)  # slow senders cut off after app.state.body_timeout_s (15 s unless set)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class VLMAPI:
    """HTTP front: validates requests and calls the answerer."""

    def __init__(self, answerer: DeploymentHandle, max_new_tokens_limit: int = 128,
                 max_upload_bytes: int = 5 * 1024**2):
        self.answerer = answerer
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_upload_bytes = max_upload_bytes

    def _images(self, encoded: list[str]) -> list[Image.Image]:
        if not 1 <= len(encoded) <= MAX_IMAGES:
            raise HTTPException(400, f"give one or two images, got {len(encoded)}")
        images = []
        for k, item in enumerate(encoded):
            try:
                images.append(decode_base64_image(item, self.max_upload_bytes))
            except HTTPException as exc:
                raise HTTPException(exc.status_code, f"images[{k}]: {exc.detail}") from exc
        return images

    def _knobs(self, body: AskRequest) -> tuple:
        if not 1 <= body.max_new_tokens <= self.max_new_tokens_limit:
            raise HTTPException(400, f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}")
        if body.temperature < 0 or not 0 < body.top_p <= 1 or body.top_k < 0 or not 1 <= body.num_beams <= 8:
            raise HTTPException(400, "temperature must be >= 0, top_p in (0, 1], top_k >= 0, num_beams in 1..8")
        return (body.max_new_tokens, body.temperature, body.top_p, body.top_k, body.num_beams)

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when the model is loaded; 503 with the reason otherwise."""
        health = await self.answerer.health.remote()
        if health.get("reason"):
            health["reason"] = public_message(health["reason"])
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    @app.post("/ask")
    async def ask(self, body: AskRequest) -> dict[str, Any]:
        """Judge ``statement`` (True/False + p_true) or answer ``prompt`` about the images."""
        statement, prompt = (body.statement or "").strip(), (body.prompt or "").strip()
        if bool(statement) == bool(prompt):
            raise HTTPException(400, "give exactly one of statement or prompt")
        images = self._images(body.images)
        knobs = self._knobs(body)
        started = time.perf_counter()
        if statement:
            result = await call(self.answerer.judge.remote(statement, images))
        else:
            result = await call(self.answerer.ask.remote(prompt, images, knobs))
        result["took_ms"] = round(1000 * (time.perf_counter() - started), 2)
        result["mode"] = "statement" if statement else "prompt"
        return result

    @app.get("/stats", include_in_schema=False)
    async def stats(self) -> dict[str, Any]:
        """Batching figures of one answerer replica."""
        return await self.answerer.stats.remote()


def build_app(args: dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The vlm application for ``serve run`` / config files; ``args`` fill :class:`VlmAppArgs`,
    ``deployments`` (a config's per-deployment options by name) are applied when given.

    A model that cannot load still builds an app whose ``/healthz`` and ``/ask`` answer 503 with the
    reason (so a deploy never hangs on it); local paths are made absolute (replicas run elsewhere).
    """
    cfg = build_config(VlmAppArgs, args)
    model = str(Path(cfg.model).expanduser().resolve()) if cfg.model and Path(cfg.model).expanduser().is_dir() \
        else cfg.model
    adapter = str(Path(cfg.adapter).expanduser().resolve()) if cfg.adapter else ""
    template = str(Path(cfg.prompt_template).expanduser().resolve()) if cfg.prompt_template else ""
    answerer = VLMAnswerer.options(**options_of(deployments, "VLMAnswerer")).bind(
        model, adapter, cfg.device, template, cfg.max_batch_size, cfg.batch_wait_timeout_s)
    return VLMAPI.options(**options_of(deployments, "VLMAPI")).bind(
        answerer, cfg.max_new_tokens_limit, cfg.max_upload_bytes)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm serve --model SPEC [--adapter DIR] [--port 8000] [key=value ...]``."""
    args = app_parser("vlmlab vlm serve", __doc__.split("\n")[0], VlmAppArgs).parse_args(argv)
    run_app(args, APP_NAME, VlmAppArgs, "/vlm/ask")


if __name__ == "__main__":
    main()

