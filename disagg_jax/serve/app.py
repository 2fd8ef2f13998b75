"""The OpenAI-compatible HTTP server (FastAPI) in front of an engine running in its own threads
(any `engine.api.EngineAPI`: the in-process Engine or the Ray ClusterEngine).

Tokens cross from the engine's threads to the event loop through `call_soon_threadsafe` into a
per-request asyncio queue; nothing blocks the loop (tokenization and chat templates run in a
worker thread). At most `max_pending` requests are in flight (beyond: 429 with Retry-After);
bodies over `max_request_bytes` get 413; with `api_key`, requests need `Authorization: Bearer
KEY` (401 otherwise). A client that disconnects, streaming or not, aborts its request within
DISCONNECT_CHECK_S, which frees its slot and pages. When the engine cannot serve (a crashed
worker, a phase with no live worker), /health says so and requests get 503 at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import random
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg_jax.engine.api import EngineAPI
from disagg_jax.engine.request import RequestOutput
from disagg_jax.engine.sampling import MAX_SEED, InvalidRequestError, SamplingParams
from disagg_jax.serve import protocol
from disagg_jax.serve.chat import ChatTemplate
from disagg_jax.serve.metrics import ServerMetrics
from disagg_jax.serve.protocol import APIError
from disagg_jax.serve.text import IncrementalText

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_CHECK_S = 0.25  # how often a request's client is checked, tokens flowing or not
RETRY_AFTER_S = 1  # the Retry-After of a 429
MAX_REQUEST_BYTES = 8 << 20  # default body limit (--max_request_bytes)
SSE_EVENT = {"type": "object", "properties": {
    "data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end."},
    "event": {"type": "string"}}, "required": ["data"]}
ERRORS = {200: {"description": "The completion; with `stream: true`, server-sent events",
               "content": {"text/event-stream": {"schema": SSE_EVENT}}},
          400: {"model": protocol.ErrorResponse, "description": "Invalid request"},
          404: {"model": protocol.ErrorResponse, "description": "Unknown model"},
          401: {"model": protocol.ErrorResponse, "description": "Missing or wrong API key"},
          413: {"model": protocol.ErrorResponse, "description": "Request body too large"},
          429: {"model": protocol.ErrorResponse, "description": "Too many requests in flight"},
          503: {"model": protocol.ErrorResponse, "description": "The engine cannot serve"}}


class Server:
  """Turns API requests into engine requests and engine outputs into API responses."""

  def __init__(self, engine: EngineAPI, model_name: str, model_dir: str | None,
               max_pending: int = 256, api_key: str | None = None,
               open_paths: tuple[str, ...] = ("/health", "/metrics"),
               max_request_bytes: int = MAX_REQUEST_BYTES):
    self.engine = engine
    self.api_key = api_key or None
    self.open_paths = tuple(open_paths)  # served without the API key
    self.max_request_bytes = max_request_bytes
    self.model_name = model_name
    self.tokenizer = engine.tokenizer
    self.chat_template = ChatTemplate.for_model(model_dir)
    self.max_pending = max_pending
    self.pending = 0
    self.metrics = ServerMetrics()
    self.created = int(time.time())

  # ------------------------------------------------------------------ request preparation

  def check_model(self, model: str) -> None:
    if model != self.model_name:
      raise APIError(404, f"The model `{model}` does not exist; this server serves "
                          f"`{self.model_name}`.", param="model", code="model_not_found")

  async def prompt_ids(self, prompt) -> list[int]:
    """Token ids of a prompt (text is tokenized in a worker thread, off the event loop)."""
    if isinstance(prompt, str):
      return await asyncio.to_thread(self.tokenizer.encode, prompt)
    return list(prompt)

  async def chat_prompt(self, messages) -> list[int]:
    """The chat template applied to `messages` and tokenized, in a worker thread."""
    def render():
      try:
        text = self.chat_template.render(messages)
      except Exception as e:  # a template may raise on message orders it does not support
        raise APIError(400, f"the chat template rejected the messages: {e}",
                       param="messages") from None
      return self.tokenizer.encode(text)
    return await asyncio.to_thread(render)

  def sampling(self, body, prompt_len: int, default_max: int | None,
               logprobs: int | None = None) -> SamplingParams:
    limit = self.engine.limits.max_seq_len - prompt_len
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is None:
      max_tokens = default_max if default_max is not None else limit
      max_tokens = max(1, min(max_tokens, limit))
    try:
      return SamplingParams(
          max_new_tokens=max_tokens,
          temperature=1.0 if body.temperature is None else body.temperature,
          top_p=1.0 if body.top_p is None else body.top_p,
          top_k=max(body.top_k or 0, 0),
          min_p=body.min_p or 0.0,
          seed=random.randrange(MAX_SEED) if body.seed is None else body.seed,
          ignore_eos=body.ignore_eos, logprobs=logprobs,
          presence_penalty=body.presence_penalty or 0.0,
          frequency_penalty=body.frequency_penalty or 0.0,
          repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty)
    except InvalidRequestError as e:
      raise APIError(400, str(e)) from None

  # ------------------------------------------------------------------ running a request

  async def run(self, http_request: Request, prompt_ids: list[int], sampling: SamplingParams,
                stop, stream: bool, include_usage: bool, kind: str, n: int = 1,
                echo=None):
    """Serves one API request as `n` engine requests (choice i samples with seed + i; with
    prefix caching they share the prompt's pages once the first has computed them). `echo`:
    the request's prompt (text or ids), put before each completion's text; None: not."""
    if self.pending >= self.max_pending:
      self.metrics.rejected += 1
      raise APIError(429, f"{self.pending} requests are in flight, the limit is "
                          f"{self.max_pending} (--max_pending); retry later",
                     type_="rate_limit_error", code="too_many_requests",
                     headers={"Retry-After": str(RETRY_AFTER_S)})
    status, why = self.engine.health()
    if status == "unavailable":
      raise APIError(503, f"the engine cannot serve requests: {why}",
                     type_="service_unavailable", code="unavailable")
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()  # (choice, token or the final RequestOutput)
    handles = []
    try:
      for i in range(n):
        forward = functools.partial(_forward, loop, items, i)
        params = sampling if i == 0 else sampling.replace(seed=(sampling.seed + i) % MAX_SEED)
        handle = self.engine.add_request(prompt_ids, params, on_token=forward)
        # Every request is counted once it ends, however it ends (aborted ones included).
        handle.add_done_callback(self.metrics.observe)
        handle.add_done_callback(forward)
        handles.append(handle)
    except InvalidRequestError as e:
      for handle in handles:
        self.engine.abort(handle.request_id)
      raise APIError(400, str(e), param=e.param or "prompt") from None
    if echo is not None:  # the ids are known to be valid now
      echo = echo if isinstance(echo, str) else self.tokenizer.decode(prompt_ids)
    self.pending += 1
    request = _Served(protocol.new_id("cmpl" if kind == "completion" else "chatcmpl"), handles,
                      [IncrementalText(self.tokenizer, stop or ()) for _ in range(n)],
                      len(prompt_ids), kind, echo or "", sampling.logprobs is not None)
    if stream:
      return StreamingResponse(self._events(http_request, items, request, include_usage),
                               media_type="text/event-stream")
    try:
      outputs = await self._consume(http_request, items, request)
    finally:
      self.pending -= 1
    make = protocol.completion_body if kind == "completion" else protocol.chat_body
    choices = [(request.echo + text.text, self._finish_reason(output, text))
               for text, output in zip(request.texts, outputs)]
    logprobs = [request.logprobs_object(self.tokenizer, o.output_token_ids, o.logprobs)
                for o in outputs]
    return JSONResponse(make(request.id, self.model_name, choices, len(prompt_ids),
                             sum(len(o.output_token_ids) for o in outputs), _cached(outputs[0]),
                             logprobs=logprobs))

  async def _next(self, http_request: Request, items: asyncio.Queue, request: "_Served",
                  watch: list):
    """The next (choice, token or final output). Every DISCONNECT_CHECK_S (`watch` holds the
    time of the last check), whether tokens flow or not, checks the client and aborts the
    request's engine requests if it went away (their final outputs then follow at once)."""
    while True:
      now = time.monotonic()
      if now - watch[0] >= DISCONNECT_CHECK_S:
        watch[0] = now
        if await http_request.is_disconnected():
          for handle in request.handles:
            self.engine.abort(handle.request_id)
      try:
        return await asyncio.wait_for(items.get(), timeout=DISCONNECT_CHECK_S)
      except asyncio.TimeoutError:
        pass

  async def _consume(self, http_request, items, request: "_Served") -> list[RequestOutput]:
    """Every choice's tokens into its text; the final outputs, by choice."""
    watch = [time.monotonic()]
    outputs: list = [None] * len(request.handles)
    while any(o is None for o in outputs):
      i, item = await self._next(http_request, items, request, watch)
      text = request.texts[i]
      if isinstance(item, RequestOutput):
        text.finish()
        outputs[i] = item
        continue
      text.add(item)
      if text.stopped:
        self.engine.abort(request.handles[i].request_id)
    return outputs

  async def _events(self, http_request, items, request: "_Served", include_usage: bool):
    kind, model = request.kind, self.model_name
    chunk = protocol.completion_chunk if kind == "completion" else protocol.chat_chunk
    n = len(request.handles)
    outputs: list = [None] * n
    watch = [time.monotonic()]
    try:
      for i in range(n):
        if kind == "chat":
          yield _sse(chunk(request.id, model, {"role": "assistant", "content": ""}, None, i))
        elif request.echo:
          yield _sse(chunk(request.id, model, request.echo, None, i))
      while any(o is None for o in outputs):
        i, item = await self._next(http_request, items, request, watch)
        text = request.texts[i]
        if isinstance(item, RequestOutput):
          outputs[i] = item
          delta = text.finish()
          reason = self._finish_reason(item, text)
          yield _sse(chunk(request.id, model, _delta(kind, delta), reason, i))
          continue
        delta = text.add(item)
        logprobs = request.next_logprobs(self.tokenizer, i, item)
        if text.stopped:
          self.engine.abort(request.handles[i].request_id)
          continue
        # One chunk per token, even when its text is held back (a partial character, a possible
        # stop sequence): streaming clients time tokens by chunks.
        yield _sse(chunk(request.id, model, _delta(kind, delta), None, i, logprobs))
      if include_usage:  # plus this server's per-phase times, which clients may ignore
        yield _sse({"id": request.id, "object": chunk(request.id, "", "", None)["object"],
                    "created": int(time.time()), "model": model, "choices": [],
                    "usage": protocol.usage(request.prompt_len,
                                            sum(len(o.output_token_ids) for o in outputs),
                                            _cached(outputs[0])),
                    "phases_s": outputs[0].metrics.phases() if outputs[0].metrics else None})
      yield "data: [DONE]\n\n"
    finally:
      self.pending -= 1
      for handle, output in zip(request.handles, outputs):
        if output is None:  # the client disconnected mid-stream
          self.engine.abort(handle.request_id)

  @staticmethod
  def _finish_reason(output: RequestOutput, text: IncrementalText) -> str:
    if text.stopped:
      return "stop"
    if output.finish_reason == "error":
      return "error"
    return output.finish_reason if output.finish_reason in ("stop", "length") else "abort"


@dataclasses.dataclass
class _Served:
  """One API request in flight: its id, its engine requests (one per choice) and their texts."""
  id: str
  handles: list
  texts: list
  prompt_len: int
  kind: str  # "completion" | "chat"
  echo: str = ""
  logprobs: bool = False  # asked for
  # Streaming: tokens sent so far, and where the next token's text starts, per choice.
  sent: list = dataclasses.field(default_factory=list)
  offsets: list = dataclasses.field(default_factory=list)

  def logprobs_object(self, tokenizer, token_ids, logprobs):
    """The API's logprobs object of these tokens (None when not asked for)."""
    if not self.logprobs:
      return None
    if self.kind == "chat":
      return protocol.chat_logprobs(tokenizer, token_ids, logprobs)
    return protocol.completion_logprobs(tokenizer, token_ids, logprobs, len(self.echo))

  def next_logprobs(self, tokenizer, choice: int, token: int):
    """Streaming: the logprobs object of `choice`'s next token (its stream holds the entry)."""
    if not self.logprobs:
      return None
    if not self.sent:
      self.sent, self.offsets = [0] * len(self.handles), [len(self.echo)] * len(self.handles)
    entry = self.handles[choice].logprobs[self.sent[choice]]
    self.sent[choice] += 1
    if self.kind == "chat":
      return protocol.chat_logprobs(tokenizer, [token], [entry])
    out = protocol.completion_logprobs(tokenizer, [token], [entry], self.offsets[choice])
    self.offsets[choice] += len(out["tokens"][0])
    return out


def _forward(loop, items: asyncio.Queue, choice: int, item) -> None:
  """From an engine thread: a token or final output of `choice` onto the event loop's queue."""
  try:
    loop.call_soon_threadsafe(items.put_nowait, (choice, item))
  except RuntimeError:  # the loop has closed (server shutting down)
    pass


def _cached(output: RequestOutput) -> int:
  """Prompt tokens the engine found in its prefix cache."""
  return int(getattr(output.metrics, "cached_tokens", 0) or 0)


def _delta(kind: str, text: str):
  return text if kind == "completion" else ({"content": text} if text else {})


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"


def build_app(server: Server) -> FastAPI:
  app = FastAPI(title="disagg_jax", version="0.1.0",
                description="OpenAI-compatible completions and chat completions.")

  @app.exception_handler(APIError)
  async def api_error(_, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

  app.add_middleware(_Guard, server=server)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = first.get("msg", "invalid request")
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
      message, param = "the request body is not valid JSON (or not UTF-8)", None
    return JSONResponse(APIError(400, f"{param + ': ' if param else ''}{message}",
                                 param=param).body(), status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, exc: StarletteHTTPException):
    message = str(exc.detail)
    if exc.status_code == 400:  # FastAPI's own parse failure (e.g. a body that is not UTF-8)
      message = f"the request body is not valid JSON (or not UTF-8): {message}"
    return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

  @app.post("/v1/completions", responses=ERRORS)
  async def completions(body: protocol.CompletionRequest, request: Request):
    server.check_model(body.model)
    prompt = await server.prompt_ids(body.prompt)
    sampling = server.sampling(body, len(prompt), COMPLETION_DEFAULT_MAX_TOKENS, body.logprobs)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await server.run(request, prompt, sampling, body.stop, bool(body.stream),
                            include_usage, "completion", n=body.n or 1,
                            echo=body.prompt if body.echo else None)

  @app.post("/v1/chat/completions", responses=ERRORS)
  async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
    server.check_model(body.model)
    prompt = await server.chat_prompt([m.model_dump() for m in body.messages])
    sampling = server.sampling(body, len(prompt), None, body.num_logprobs())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await server.run(request, prompt, sampling, body.stop, bool(body.stream),
                            include_usage, "chat", n=body.n or 1)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": server.model_name, "object": "model", "created": server.created,
        "owned_by": "disagg_jax", "max_model_len": server.engine.limits.max_seq_len}]}

  @app.get("/health")
  async def health():
    """ok; degraded (served, with less capacity: a worker died); unavailable (503, with the
    reason: requests fail until it recovers)."""
    status, why = server.engine.health()
    body = {"status": status} if why is None else {"status": status, "reason": why}
    return JSONResponse(body, status_code=503 if status == "unavailable" else 200)

  @app.get("/metrics", response_class=PlainTextResponse)
  async def metrics():
    return server.metrics.render(server.engine.stats(), server.pending)

  def openapi_schema():
    """FastAPI's schema, with `model` narrowed to the one model served (others get 404)."""
    if app.openapi_schema is None:
      schema = get_openapi(title=app.title, version=app.version, description=app.description,
                           routes=app.routes)
      for name in ("CompletionRequest", "ChatCompletionRequest"):
        schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [
            server.model_name]
      app.openapi_schema = schema
    return app.openapi_schema

  app.openapi = openapi_schema
  return app


class _TooLarge(BaseException):
  """A body past the limit, raised from `receive`: a BaseException, so that FastAPI's body
  parsing (which turns any Exception into a 400) lets it through to `_Guard`."""


class _Guard:
  """ASGI middleware in front of every route: the API key (`Server.api_key`, except on
  `Server.open_paths`) and the body size limit (`Server.max_request_bytes`: a declared length
  over it is refused before reading; a chunked body as soon as it passes it)."""

  def __init__(self, app, server: Server):
    self.app, self.server = app, server

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    server = self.server
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if server.api_key and scope["path"] not in server.open_paths:
      given = headers.get("authorization", "")
      scheme, _, token = given.partition(" ")
      if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                               server.api_key.encode()):
        return await _reply(send, APIError(
            401, "a valid API key is needed: send `Authorization: Bearer KEY` (--api_key)",
            type_="authentication_error", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"}))
    limit = server.max_request_bytes
    too_large = APIError(413, f"the request body exceeds {limit:,} bytes "
                              "(--max_request_bytes)", code="request_too_large")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
      return await _reply(send, too_large)
    seen, started = 0, False

    async def counted():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > limit:
          raise _TooLarge
      return message

    async def watched(message):
      nonlocal started
      started = started or message["type"] == "http.response.start"
      await send(message)

    try:
      await self.app(scope, counted, watched)
    except _TooLarge:
      if not started:
        await _reply(send, too_large)


async def _reply(send, error: APIError) -> None:
  """Sends `error` as a complete JSON response."""
  body = json.dumps(error.body()).encode()
  headers = [(b"content-type", b"application/json"),
             (b"content-length", str(len(body)).encode())]
  headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
  await send({"type": "http.response.start", "status": error.status, "headers": headers})
  await send({"type": "http.response.body", "body": body})
