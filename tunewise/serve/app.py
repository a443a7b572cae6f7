"""`tunewise serve`: an OpenAI-compatible API over the engine, the registry and the knowledge base.

Models a request can name (GET /v1/models lists them):
- `base` (or the configured model reference): the base model;
- `production`, `<name>:production`, `<name>:<version>`: registry models; adapters attach to the one
  base model in memory and are chosen per request (like vLLM's --enable-lora); a full fine-tuned model
  gets its own engine;
- any of those with `+kb`: retrieval over the project's knowledge base, with the answer's citations
  (source and chunk) in the extra `citations` field and the retrieved chunks in `retrieved`.
Model names are checked against a strict pattern and resolved only through the registry, never as
paths. Errors use OpenAI's shape ({"error": {"message", "type", "code"}}) and never carry a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ProjectConfig
from ..engine import ChoiceError
from .batcher import Batcher, Call, Job, QueueFull
from .toolstream import CallStream

log = logging.getLogger("tunewise.access")
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:(production|[0-9]{1,9}))?(\+kb)?$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _error(status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status, headers=headers)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict) and p.get("type") == "text")
        return self.content or ""


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI parameters: see UNSUPPORTED (refused) and what is honoured
    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, description="Sampling reproducible: a request with a seed is decoded in a batch of its own.")


# OpenAI parameters this server does not honour: a request that sets one (to anything but its no-op value) is a 400
# that names it, never a 200 that ignored it. Accepted and without effect on the answer: user, metadata, store,
# stream_options (usage is always in the last chunk).
UNSUPPORTED = {"functions": "legacy function calls (send tools)", "function_call": "legacy function calls (send tool_choice)", "logprobs": "log-probabilities", "top_logprobs": "log-probabilities",
               "logit_bias": "logit bias", "presence_penalty": "penalties", "frequency_penalty": "penalties", "audio": "audio",
               "modalities": "other modalities", "prediction": "predicted outputs", "reasoning_effort": "reasoning effort"}
NO_OP = (None, False, 0, 0.0, "none", [], {}, ["text"])


def refuse_unsupported(req: BaseModel) -> None:
    for key, value in (req.model_extra or {}).items():
        if key in UNSUPPORTED and value not in NO_OP:
            raise ApiError(400, f"{key}: {UNSUPPORTED[key]} are not supported by this server (the request would be answered as if "
                                "it were not set); remove it", code="unsupported_parameter")


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


class Models:
    """Resolves request model names to (engine, adapter) on the worker thread; loads adapters on first use."""

    def __init__(self, cfg: ProjectConfig, engine=None):
        from ..registry import Registry, registry_path

        self.cfg = cfg
        self.name = cfg.gate.name or cfg.project
        self.registry = Registry(registry_path(cfg))
        self.lock = threading.Lock()  # the registry connection is shared by request threads and the worker
        self._base = engine
        self.full: dict[str, Any] = {}
        self._retriever = None
        self._embedder = None

    @property
    def base(self):
        if self._base is None:
            from ..engine import Engine

            self._base = Engine.load(self.cfg.model.name, device=self.cfg.model.device, dtype=self.cfg.model.dtype,
                                     chat_kwargs=self.cfg.data.template_kwargs)  # prompts rendered as training rendered them
        return self._base

    def entry(self, model: str):
        """The registry entry a name points at (None: the base model). Raises ApiError 400/404."""
        from ..registry import RegistryError

        model = self.resolve(model)
        if not MODEL_RE.match(model):
            raise ApiError(400, "invalid model name: expected base, production, NAME:VERSION or NAME:production, optionally +kb",
                           code="invalid_model")
        name = model.removesuffix("+kb")
        if name in ("base", self.cfg.model.name):
            return None
        if name == "production":
            name = f"{self.name}:production"
        with self.lock:
            try:
                return self.registry.get(name if ":" in name else f"{name}:production")
            except RegistryError as e:
                if name == f"{self.name}:production" and "no production model" in str(e):
                    return None  # nothing promoted yet: production is the base model
                raise ApiError(404, f"model {model!r} not found: {e}", code="model_not_found") from None

    def resolve(self, model: str) -> str:
        """The name behind an alias (serve.aliases: a name clients already send), else the name itself."""
        return self.cfg.serve.aliases.get(model, model)

    def engine_for(self, entry):
        """On the worker thread: the engine and adapter name serving a registry entry."""
        if entry is None:
            return self.base, None
        if entry.adapter:
            eng = self.base
            if entry.ref not in eng.adapters:
                eng.add_adapter(entry.ref, entry.path)
            return eng, entry.ref
        if entry.ref not in self.full:
            from ..engine import Engine

            self.full[entry.ref] = Engine.load(entry.path, device=self.cfg.model.device, dtype=self.cfg.model.dtype)
        return self.full[entry.ref], None

    def listing(self) -> list[dict]:
        has_kb = self.kb_ready()
        names = ["base", "production"]
        with self.lock:
            names += [m.ref for m in self.registry.models()]
            prod = None
            try:
                prod = self.registry.get(f"{self.name}:production").ref
            except Exception:  # noqa: BLE001 - no production model yet
                pass
        out = []
        for n in names:
            for suffix in ("", "+kb") if has_kb else ("",):
                meta = {"id": n + suffix, "object": "model", "created": 0, "owned_by": "tunewise"}
                if n == "production":
                    meta["tunewise_resolves_to"] = prod or "base"
                out.append(meta)
        for alias, to in self.cfg.serve.aliases.items():
            out.append({"id": alias, "object": "model", "created": 0, "owned_by": "tunewise", "tunewise_alias_of": to})
        return out

    def kb_ready(self) -> bool:
        from ..rag.retrieve import index_dir_of

        return bool(self.cfg.rag.knowledge_base) and (index_dir_of(self.cfg) / "chunks.jsonl").exists()

    def retriever(self):
        if self._retriever is None:
            from ..rag.retrieve import Retriever

            self._retriever = Retriever(self.cfg)
        return self._retriever

    def embedder(self):
        if self._embedder is None:
            from ..models import bundled_embedding_dir
            from ..rag.embed import Embedder

            m = self.cfg.rag.embedding_model
            self._embedder = Embedder(str(bundled_embedding_dir()) if m.startswith("bundled:") else m, url=self.cfg.rag.embedding_url)
        return self._embedder


def _api_keys(cfg: ProjectConfig) -> list[str]:
    env = [k.strip() for k in os.environ.get("TUNEWISE_API_KEYS", "").split(",") if k.strip()]
    return list(cfg.serve.api_keys) + env


class _BodyLimit:
    """Pure ASGI middleware: 413 for a body over the limit, by Content-Length or while it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, f"request body over {self.limit} bytes", "invalid_request_error", "body_too_large")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body over {self.limit} bytes", code="body_too_large")
            return msg

        return await self.app(scope, limited, send)


def _choices(req: Sampling) -> tuple[str, tuple] | None:
    """(field, constraint) the request asks for: ("choices", answers) for a closed set (structured_outputs.choice,
    guided_choice, a finite json_schema), or a grammar (a free-form schema, json_object, a regex, EBNF); a
    constraint this server cannot enforce is a 400 naming the field."""
    from .structured import request_constraint

    try:
        got = request_constraint(req.model_extra or {})
    except ChoiceError as e:
        raise ApiError(400, str(e), code="unsupported_structured_output") from None
    if got is None:
        return None
    field, (kind, value) = got
    return field, (kind, tuple(value) if kind == "choices" else value)


def create_app(cfg: ProjectConfig, engine=None) -> FastAPI:
    """The app: state (config, models, batcher, API keys), middleware (auth, access log, body limit, CORS),
    error handlers in OpenAI's shape, and the routes (module-level handlers reading app.state)."""
    s = cfg.serve
    batcher = Batcher(s.max_batch, s.batch_wait_ms / 1000, s.queue_size)

    @asynccontextmanager
    async def lifespan(_):
        yield
        batcher.close()

    app = FastAPI(title="tunewise", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.cfg, app.state.models, app.state.batcher, app.state.keys = cfg, Models(cfg, engine), batcher, _api_keys(cfg)
    app.state.log = None
    if s.log_requests:
        from ..data.prodlog import RequestLog

        app.state.log = RequestLog(cfg.serve_log_dir, s.log_max_bytes, s.log_fsync, tuple(cfg.data.clean.pii_types))
    if s.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=s.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.middleware("http")(_auth_and_log)
    app.add_middleware(_BodyLimit, limit=s.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
    app.include_router(router)
    return app


async def _auth_and_log(request: Request, call_next):
    t0 = time.perf_counter()
    rid = uuid.uuid4().hex[:12]
    keys = request.app.state.keys
    if keys and request.url.path.startswith("/v1/"):
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            response = _error(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error", "invalid_api_key")
            _access(request, response.status_code, t0, rid)
            return response
    try:
        response = await call_next(request)
    except ApiError as e:
        response = _error(e.status, e.message, e.type, e.code, e.headers)
    response.headers["x-request-id"] = rid
    _access(request, response.status_code, t0, rid)
    return response


async def _api_error(_, e: ApiError):
    return _error(e.status, e.message, e.type, e.code, e.headers)


async def _bad_request(_, e: RequestValidationError):
    errs = e.errors()
    where = ".".join(str(x) for x in errs[0].get("loc", [])[1:]) if errs else ""
    msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
    if errs and errs[0].get("type") == "json_invalid":
        return _error(400, "request body is not valid JSON", "invalid_request_error", "invalid_json")
    return _error(400, f"{where}: {msg}" if where else msg, "invalid_request_error", "invalid_request")


async def _http_error(_, e: StarletteHTTPException):
    return _error(e.status_code, str(e.detail), "invalid_request_error", None)


async def _internal(_, e: Exception):  # never a traceback in a response
    logging.getLogger("tunewise.serve").exception("internal error")
    return _error(500, "internal server error", "server_error", None)


router = APIRouter()


@router.get("/health")
async def health(request: Request):
    b = request.app.state.batcher
    return {"status": "ok", "queue": b.q.qsize(), "batches": b.batches, "rows": b.rows}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": request.app.state.models.listing()}


def chat_turns(req: ChatRequest, tools=None) -> list[dict]:
    """The request's messages as engine turns (developer counts as system). With tools (a ToolRequest), earlier calls and
    tool results are rendered in the text form training used (data/tools.py); without, tool turns are dropped."""
    if tools is None:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages if m.role != "tool"]
    return tools.turns(req)


class ToolRequest:
    """A chat request's `tools`, `tool_choice` and `parallel_tool_calls`: how its conversation is rendered, what decoding is
    constrained to (data.tools.call_grammar: every call names one of the tools and its arguments are valid against that
    tool's parameters; auto leaves text free around the calls, required and a named function admit only calls), and how
    an answer becomes `tool_calls`."""

    def __init__(self, extra: dict):
        from ..data.tools import ToolError, tool_list

        choice = extra.get("tool_choice", "auto")
        try:
            self.tools = tool_list(extra["tools"], "tools")
        except ToolError as e:
            raise ApiError(400, str(e), code="invalid_tools") from None
        names = [t["function"]["name"] for t in self.tools]
        self.parallel = extra.get("parallel_tool_calls", True) is not False
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise ApiError(400, f"tool_choice: function {name!r} is not one of tools ({', '.join(names)})", code="invalid_tool_choice")
            self.mode, self.names = "named", [name]
        elif choice in ("none", "auto", "required"):
            self.mode, self.names = choice, names
        else:
            raise ApiError(400, f"tool_choice: {choice!r}: expected none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           code="invalid_tool_choice")

    def turns(self, req: ChatRequest) -> list[dict]:
        from ..data.tools import ToolError, normalize_openai, render_text

        msgs = []
        for m in req.messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": m.text() if m.content is not None else None}
            d |= {k: v for k, v in (m.model_extra or {}).items() if k in ("tool_calls", "tool_call_id", "name")}
            msgs.append(d)
        try:
            msgs, tools = normalize_openai({"messages": msgs, "tools": self.tools})
        except ToolError as e:
            raise ApiError(400, str(e), code="invalid_messages") from None
        return render_text(msgs, [] if self.mode == "none" else tools)

    def constraint(self):
        """(field, (kind, source)) for the decoder: the call grammar under auto, required and a named function; None under none."""
        from ..data.tools import call_grammar

        if self.mode == "none":
            return None
        return "tool_choice", ("structural_tag", call_grammar(self.tools, self.names[0] if self.mode == "named" else self.mode, self.parallel))

    def shape(self, text: str, finish: str) -> tuple[dict, str]:
        """The assistant message and finish reason of one answer: tool_calls with ids where the answer holds calls of the
        tools (serve/toolstream.py reads them; CallStream streams the same message)."""
        from ..data.tools import ToolError, check_call
        from .toolstream import calls_of

        if self.mode == "none":
            return {"role": "assistant", "content": text}, finish

        def valid(name: str, args) -> bool:
            try:
                check_call(name, args, self.tools, "call")
                return True
            except (ToolError, TypeError):
                return False

        calls, rest, cut = calls_of(text, valid)
        calls = calls[: None if self.parallel else 1]
        if not calls:  # auto: the model answered in text; required or named: cut off (length) before a call's name
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": rest, "tool_calls": calls}, finish if cut is not None and cut < len(calls) else "tool_calls"


def chat_conversation(models: Models, turns: list[dict], rag: bool, tok):
    """On the worker thread: the conversation the model answers, and the retrieved context (None without +kb).
    With +kb it is rag_conversation, as in RAFT training data and the rag/ft+rag evaluation variants."""
    if not rag:
        return turns, None
    from ..rag.answer import rag_conversation, rag_prompts

    cfg = models.cfg
    question = next((t["content"] for t in reversed(turns) if t["role"] == "user"), "")
    ctx = rag_prompts(models.retriever(), [question], cfg.rag, tok)[0]
    return rag_conversation(turns, ctx.prompt, cfg.rag.system_prompt), ctx


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request):
    refuse_unsupported(req)
    extra_fields = req.model_extra or {}
    tools = ToolRequest(extra_fields) if extra_fields.get("tools") else None
    if tools is None and extra_fields.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice: given without tools", code="invalid_tool_choice")
    models = request.app.state.models
    entry = models.entry(req.model)
    rag = models.resolve(req.model).endswith("+kb")
    if rag and not models.kb_ready():
        raise ApiError(400, f"model {req.model!r}: no knowledge-base index (configure rag.knowledge_base and run `tunewise kb index`)",
                       code="no_knowledge_base")
    turns = chat_turns(req, tools)
    ctx_box: dict = {}

    def prepare():
        eng, adapter = models.engine_for(entry)
        conv, ctx_box["ctx"] = chat_conversation(models, turns, rag, eng.tok)
        return eng, adapter, [conv] * req.n

    def extra(text: str) -> dict:
        ctx = ctx_box.get("ctx")
        if ctx is None:
            return {}
        return {"citations": ctx.cited(text),
                "retrieved": [{"n": i, "source": h.chunk.citation, "chunk": h.chunk.id} for i, h in enumerate(ctx.hits, 1)]}

    constraint, held = _choices(req), False  # held: decoded under the call grammar, so every block is a call in the form
    if tools is not None and tools.mode != "none":
        if constraint is not None and tools.mode != "auto":
            raise ApiError(400, f"tool_choice {tools.mode} and {constraint[0]}: give one constraint per request", code="unsupported_structured_output")
        if constraint is None:  # under auto with response_format (or another constraint), the answer is held to that instead
            constraint, held = tools.constraint(), True
    return await _respond(request, req, prepare, "chat.completion", extra, constraint, logged=(turns, _version(models, entry)),
                          shape=tools.shape if tools is not None else None, calls_stream=held)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    refuse_unsupported(req)
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        if (req.model_extra or {}).get(key) not in (None, False, "none", []):
            raise ApiError(400, f"{key}: tool calls are a chat feature: use /v1/chat/completions", code="unsupported_parameter")
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise ApiError(400, "prompt: one prompt per request (send a list of one, or a string)", code="invalid_request")
    models = request.app.state.models
    if models.resolve(req.model).endswith("+kb"):
        raise ApiError(400, "+kb models are chat models: use /v1/chat/completions", code="invalid_model")
    entry = models.entry(req.model)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    choices = _choices(req)

    def prepare():
        eng, adapter = models.engine_for(entry)
        return eng, adapter, [prompt] * req.n

    return await _respond(request, req, prepare, "text_completion", lambda _: {}, choices, logged=(prompt, _version(models, entry)))


def _version(models: Models, entry) -> str:
    """What answered: the registry's name:version, or the base model's reference."""
    return f"{entry.name}:{entry.version}" if entry is not None else models.cfg.model.name


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=64, description="The id of the response rated (its `id` field).")
    rating: int = Field(..., description="-1 (bad), 0 (neutral) or 1 (good).")
    correction: str | None = Field(None, description="The answer that should have been given.")
    comment: str | None = Field(None, max_length=2000)


@router.post("/v1/feedback")
async def feedback(req: FeedbackRequest, request: Request):
    """A rating and an optional corrected answer for a logged response."""
    plog, s = request.app.state.log, request.app.state.cfg.serve
    if plog is None:
        raise ApiError(400, "feedback needs the request log: serve.log_requests is false", code="log_disabled")
    if req.rating not in (-1, 0, 1):
        raise ApiError(400, f"rating: {req.rating} is not -1 (bad), 0 (neutral) or 1 (good)", code="invalid_rating")
    if req.correction is not None and not req.correction.strip():
        raise ApiError(400, "correction: empty; leave it out or give the answer that should have been given", code="invalid_correction")
    if req.correction is not None and len(req.correction) > s.max_correction_chars:
        raise ApiError(400, f"correction: {len(req.correction):,} characters; at most {s.max_correction_chars:,} (serve.max_correction_chars)",
                       code="correction_too_long")
    if not plog.known(req.id):
        raise ApiError(404, f"id {req.id!r}: no logged response has this id (use the `id` of a chat or completion response)",
                       code="unknown_id")
    await asyncio.to_thread(plog.log_feedback, req.id, req.rating, req.correction, req.comment)
    return {"object": "feedback", "id": req.id, "status": "recorded"}


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request):
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ApiError(400, "input: a non-empty string or list of non-empty strings", code="invalid_request")
    if len(texts) > 2048:
        raise ApiError(400, "input: at most 2048 strings per request", code="invalid_request")
    models, s = request.app.state.models, request.app.state.cfg.serve

    def run():
        e = models.embedder()
        return e.encode(texts), sum(e.count_tokens(t) for t in texts)

    try:
        fut = request.app.state.batcher.submit(Call(run))
    except QueueFull as e:
        raise ApiError(429, f"server busy: {e}", "rate_limit_error", "queue_full", headers={"Retry-After": "1"}) from None
    vecs, n_tok = await asyncio.wait_for(asyncio.wrap_future(fut), s.request_timeout_s)
    return {"object": "list", "model": req.model, "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok},
            "data": [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vecs)]}


async def _respond(request: Request, req: Sampling, prepare, kind: str, extra, choices: tuple | None = None, logged=None, shape=None,
                   calls_stream: bool = False):
    """Queue the generation on the batcher; the whole answer, or a stream of server-sent events. `logged` (the
    request's input and the model version) goes to the production log with the answers. shape: a tool request's
    (ToolRequest.shape); calls_stream: its calls are held to the call grammar, so they stream as they decode (else a
    tool answer is sent as deltas once decoded)."""
    s = request.app.state.cfg.serve
    max_tokens = min(req.max_completion_tokens or req.max_tokens or s.default_max_tokens, s.max_tokens_cap)
    stop = tuple([req.stop] if isinstance(req.stop, str) else (req.stop or []))[:4]
    loop = asyncio.get_running_loop()
    queue_: asyncio.Queue | None = asyncio.Queue() if req.stream else None
    field, (ckind, cvalue) = choices if choices else (None, (None, None))
    job = Job(prepare=prepare, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stop, group=req.model, seed=req.seed,
              choices=cvalue if ckind == "choices" else None, grammar=(ckind, cvalue) if ckind not in (None, "choices") else None)
    if req.stream and (shape is None or calls_stream):
        job.on_token = lambda k, ids: loop.call_soon_threadsafe(queue_.put_nowait, (k, list(ids)))
    try:
        fut = request.app.state.batcher.submit(job)
    except QueueFull as e:
        raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_error", "queue_full", headers={"Retry-After": "1"}) from None
    rid, created = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    afut = asyncio.wrap_future(fut)
    t0 = time.perf_counter()
    plog = request.app.state.log

    def write_log(outs) -> None:  # before the response goes out, so an id the client holds is always in the log
        if plog is not None and logged is not None:
            plog.log_request(rid, req.model, logged[1], kind, logged[0], outs, time.perf_counter() - t0)

    def write_error(error: str) -> None:
        if plog is not None and logged is not None:
            plog.log_error(rid, req.model, logged[1], kind, error, time.perf_counter() - t0)

    if not req.stream or (shape is not None and not calls_stream):
        try:
            outs = await asyncio.wait_for(afut, s.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            await asyncio.to_thread(write_error, "timeout")
            raise ApiError(504, f"no answer within {s.request_timeout_s:g} s", "timeout_error", "timeout") from None
        except ApiError:
            raise
        except ChoiceError as e:  # a grammar that does not compile
            raise ApiError(400, f"{field}: {e}", code="unsupported_structured_output") from None
        except Exception as e:  # noqa: BLE001 - e.g. an adapter that fails to load
            logging.getLogger("tunewise.serve").exception("generation failed")
            await asyncio.to_thread(write_error, f"generation failed: {type(e).__name__}")
            raise ApiError(500, f"generation failed: {type(e).__name__}", "server_error") from None
        choices = []
        for i, o in enumerate(outs):
            body, finish = shape(o.text, o.finish_reason) if shape else ({"role": "assistant", "content": o.text}, o.finish_reason)
            choices.append({"index": i, "finish_reason": finish, "logprobs": None}
                           | ({"message": body} if kind == "chat.completion" else {"text": o.text}))
        usage = {"prompt_tokens": outs[0].prompt_tokens * len(outs) if outs else 0,
                 "completion_tokens": sum(o.completion_tokens for o in outs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        await asyncio.to_thread(write_log, outs)
        result = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices, "usage": usage,
                  **extra(outs[0].text if outs else "")}
        if req.stream:  # tool requests decoded freely stream the finished answer as OpenAI's deltas
            return StreamingResponse(_stream_whole(result), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return result
    return StreamingResponse(_stream(req, job, afut, queue_, rid, created, kind, stop, extra, s.request_timeout_s, write_log, shape),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

async def _stream(req, job, afut, queue_, rid, created, kind, stop, extra, timeout_s: float, write_log=None, shape=None):
    """Server-sent chunks as the answer decodes. shape: a tool request held to its call grammar, whose calls stream as
    OpenAI's tool_calls deltas (serve/toolstream.CallStream) and end as shape() makes the finished message."""
    obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    emitted = [""] * req.n
    hold = max((len(x) for x in stop), default=0)
    tok = None
    calls = [CallStream() for _ in range(req.n)] if shape is not None else None

    def chunk(i, delta: str | dict | None, finish=None, **more):
        if kind == "chat.completion":
            d = delta if isinstance(delta, dict) else {} if delta is None else {"content": delta}
            if delta == "" and finish is None:
                d = {"role": "assistant", "content": ""}
            c = {"index": i, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            c = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": req.model, "choices": [c], **more}) + "\n\n"

    try:
        if kind == "chat.completion":
            for i in range(req.n):
                yield chunk(i, "")
        deadline = time.monotonic() + timeout_s
        while not afut.done():
            try:
                k, ids = await asyncio.wait_for(queue_.get(), timeout=max(0.01, min(0.25, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    job.cancelled = True
                    yield "data: " + json.dumps({"error": {"message": "timeout", "type": "timeout_error"}}) + "\n\n"
                    return
                continue
            if tok is None:
                tok = job.prepared[0].tok
            text = tok.decode(ids, skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            safe = len(text) - hold
            if calls is not None:
                for d in calls[k].feed(text[:safe]):
                    yield chunk(k, d)
            elif safe > len(emitted[k]) and text.startswith(emitted[k]):
                yield chunk(k, text[len(emitted[k]) : safe])
                emitted[k] = text[:safe]
        try:
            outs = afut.result()
        except Exception:  # noqa: BLE001
            yield "data: " + json.dumps({"error": {"message": "generation failed", "type": "server_error"}}) + "\n\n"
            return
        if write_log:
            await asyncio.to_thread(write_log, outs)
        for i, o in enumerate(outs):  # the rest, with stop strings cut: exactly the non-streamed text
            finish = o.finish_reason
            if calls is not None:
                message, finish = shape(o.text, o.finish_reason)
                for d in calls[i].finish(message):
                    yield chunk(i, d)
            elif o.text.startswith(emitted[i]) and o.text[len(emitted[i]):]:
                yield chunk(i, o.text[len(emitted[i]):])
            usage = {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                     "total_tokens": o.prompt_tokens + o.completion_tokens}
            yield chunk(i, None, finish, usage=usage, **(extra(o.text) if i == 0 else {}))
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:  # the client went away: stop streaming; the batch it shared goes on
        job.cancelled = True
        raise


async def _stream_whole(result: dict):
    """A finished chat answer as server-sent chunks, as OpenAI streams tool calls: the role, the content (if any), each
    call's id, name and arguments as a tool_calls delta, then the finish reason with usage."""
    def chunk(i, delta, finish=None, **more):
        return "data: " + json.dumps({"id": result["id"], "object": "chat.completion.chunk", "created": result["created"], "model": result["model"],
                                      "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}], **more}) + "\n\n"

    for c in result["choices"]:
        msg, i = c["message"], c["index"]
        yield chunk(i, {"role": "assistant", "content": ""})
        if msg.get("content"):
            yield chunk(i, {"content": msg["content"]})
        for k, call in enumerate(msg.get("tool_calls") or []):
            yield chunk(i, {"tool_calls": [{"index": k, **call}]})
        yield chunk(i, {}, c["finish_reason"], usage=result["usage"])
    yield "data: [DONE]\n\n"


def _access(request: Request, status: int, t0: float, rid: str) -> None:
    log.info(json.dumps({"ts": round(time.time(), 3), "id": rid, "method": request.method, "path": request.url.path, "status": status,
                         "ms": round((time.perf_counter() - t0) * 1000, 1), "client": request.client.host if request.client else None}))
