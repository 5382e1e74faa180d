"""The OpenAI-compatible app: llama-cpp-python's request types and completion calls, plus per-request
neuron-mask strengths.

What comes from llama-cpp-python's server (`llama_cpp.server`): the request models of
`/v1/chat/completions` and `/v1/completions` (every OpenAI field it supports, checked the same way), its
handling of `logit_bias`, `grammar` and `min_tokens`, its OpenAI-style error bodies (and its message for a
prompt longer than the context), and server-sent events through sse-starlette. What is added: the
`neuron_masks` request field, `GET/POST /neuron-masks`, the `neuron_masks` and `timings` response fields,
the page at `/`, HTTP 400 for every bad request, and one model worker instead of its global model proxy
(see worker.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from ..errors import CnaLocalError
from .masks import MaskRegistry, RequestError
from .worker import Job, ModelWorker

log = logging.getLogger("cna_local.serve")

# fields llama-cpp-python's server drops before calling Llama (it handles them itself or not at all)
_EXCLUDE = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}


class AuthError(Exception):
    pass


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_message(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"{param}: {first.get('msg', 'invalid value')} (got {first.get('input')!r}). Fix the field and send the request again.", param


def create_app(llm, registry: MaskRegistry, *, model_alias: str, api_key: str | None = None) -> FastAPI:
    """An app serving `llm` (a SteeredLlama) with the masks of `registry`."""
    from llama_cpp.server.errors import RouteErrorHandler
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    worker = ModelWorker(llm, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="cna-local", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible llama.cpp server with live neuron steering (cna-local).")
    app.state.worker = worker
    app.state.registry = registry
    bearer = HTTPBearer(auto_error=False)

    async def authenticate(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is not None and (credentials is None or credentials.credentials != api_key):
            raise AuthError()

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError):
        return JSONResponse(error_body("Invalid or missing API key: send the header `Authorization: Bearer <key>` "
                                       "with the key the server was started with (--api-key).",
                                       "authentication_error", code="invalid_api_key"), status_code=401)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)

    @app.exception_handler(CnaLocalError)
    async def _cna_error(request: Request, exc: CnaLocalError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    async def read_json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc}). Send a JSON object.", "body") from None

    def llama_error(exc: Exception, body) -> JSONResponse:
        """llama-cpp-python's own error formatting (context length exceeded -> 400), else 500."""
        for pattern, formatter in RouteErrorHandler.pattern_and_formatters.items():
            match = pattern.search(str(exc))
            if match is not None and body is not None:
                status, error = formatter(body, match)
                return JSONResponse({"error": error}, status_code=status)
        log.exception("request failed")
        return JSONResponse(error_body(str(exc), "internal_server_error"), status_code=500)

    async def complete(request: Request, model_cls, method: str):
        raw = await read_json(request)
        if not isinstance(raw, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(raw).__name__}.", "body")
        multipliers, gates = registry.for_request(raw.pop("neuron_masks", None), raw.pop("gate", None))
        try:
            body = model_cls(**raw)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise RequestError(message, param) from None
        if isinstance(getattr(body, "prompt", None), list):
            if len(body.prompt) > 1:
                raise RequestError("prompt: one prompt per request (a list of several is not supported).", "prompt")
            body.prompt = body.prompt[0] if body.prompt else ""
        wants_logprobs = getattr(body, "logprobs", None) not in (None, False) or getattr(body, "top_logprobs", None)
        if wants_logprobs and not getattr(llm, "_logits_all", False):
            raise RequestError("logprobs: this server was started without --logprobs, which keeps the logits of every "
                               "token (slower). Fix: restart it with --logprobs, or drop logprobs from the request.",
                               "logprobs")
        kwargs = body.model_dump(exclude=_EXCLUDE)
        kwargs["model"] = body.model or model_alias  # what the response names: the id /v1/models lists
        _prepare(llm, body, kwargs)
        stream = bool(kwargs.pop("stream", False))
        job = Job(method, kwargs, multipliers, gates)
        if not stream:
            try:
                return await worker.run(job)
            except CnaLocalError:
                raise
            except Exception as exc:  # noqa: BLE001 - answered as an OpenAI error body
                return llama_error(exc, body)
        return await _stream_response(worker.stream(job), lambda exc: llama_error(exc, body))

    @app.post("/v1/chat/completions", dependencies=[Depends(authenticate)])
    async def chat_completions(request: Request):
        return await complete(request, CreateChatCompletionRequest, "create_chat_completion")

    @app.post("/v1/completions", dependencies=[Depends(authenticate)])
    async def completions(request: Request):
        return await complete(request, CreateCompletionRequest, "create_completion")

    @app.get("/v1/models", dependencies=[Depends(authenticate)])
    async def models():
        return {"object": "list", "data": [{"id": model_alias, "object": "model", "owned_by": "cna-local",
                                            "permissions": [], "neuron_masks": registry.describe()}]}

    @app.get("/neuron-masks", dependencies=[Depends(authenticate)])
    async def get_masks():
        return registry.describe()

    @app.post("/neuron-masks", dependencies=[Depends(authenticate)])
    async def post_masks(request: Request):
        registry.set_server_wide(await read_json(request))
        return registry.describe()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("cna_local.serve").joinpath("page.html").read_text(encoding="utf-8")

    return app


def _prepare(llm, body, kwargs: dict) -> None:
    """logit_bias, grammar and min_tokens, as llama-cpp-python's server turns them into Llama arguments."""
    import llama_cpp

    if body.logit_bias is not None:
        if body.logit_bias_type == "tokens":
            bias: dict[str, float] = {}
            for token, score in body.logit_bias.items():
                for input_id in llm.tokenize(token.encode("utf-8"), add_bos=False, special=True):
                    bias[str(input_id)] = score
            kwargs["logit_bias"] = bias
        else:
            kwargs["logit_bias"] = body.logit_bias
    if body.grammar is not None:
        try:
            kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar)
        except ValueError as exc:
            raise RequestError(f"grammar: {exc}. Fix: send a valid GBNF grammar.", "grammar") from None
    if body.min_tokens > 0:
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llm.token_eos())])


async def _stream_response(chunks, on_error):
    """Server-sent events; an error before the first chunk is still an ordinary HTTP error."""
    from sse_starlette.sse import EventSourceResponse

    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except CnaLocalError:
        await chunks.aclose()
        raise
    except Exception as exc:  # noqa: BLE001
        await chunks.aclose()
        return on_error(exc)

    async def events():
        try:
            if first is not None:
                yield {"data": json.dumps(first)}
            async for chunk in chunks:
                yield {"data": json.dumps(chunk)}
            yield {"data": "[DONE]"}
        except Exception as exc:  # noqa: BLE001 - the headers are sent: report in the stream
            log.exception("stream failed")
            yield {"data": json.dumps(error_body(str(exc), "internal_server_error"))}
        finally:
            await chunks.aclose()

    return EventSourceResponse(events(), sep="\n")


def _version() -> str:
    from .. import __version__

    return __version__
