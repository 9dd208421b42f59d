"""The Ray Serve application: a thin FastAPI ingress in front of generator replicas running the sampling engine.

    HTTP ─► Ingress (validates, routes by model id, renders PNG/JSON)
               └─► Generator replicas (serving/generator.py: multiplexed subject models, @serve.batch, StepBatcher,
                   SamplingEngine)

Here: the HTTP layer (its errors, body cap, response docs, the Ingress deployment) and the application builder.

Which models are served is the deployments' `user_config` ({"models": {model_id: path}}), so deploying or
undeploying a model reconfigures the running replicas without restarting them (serving/deployer.py writes it).

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time, from the
globals that Serve pickled with the class, so they must be real objects.
"""

import asyncio
import collections
import contextlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dreambooth.errors import InputError
from dreambooth.model_files import ModelMetadata
from serving.access import Access, Unauthenticated
from serving.config import MAX_BODY_BYTES, ServeConfig
from serving.engine import ModelUnavailable
from serving.generator import GRACEFUL_SHUTDOWN_S, Generator, ModelNotServed, counted, keep_replica_grpc_on_loopback
from serving.http_api import (
    EncodedResult,
    ErrorBody,
    ErrorCode,
    GenerateBody,
    GenerateResponse,
    ModelPage,
    ServedModel,
    json_response,
    to_generation_request,
)
from serving.metrics import IngressMetrics, class_label
from serving.step_batching import OutOfDeviceMemory, TooLargeForDevice

logger = logging.getLogger(__name__)


# What a generate call raises when no replica can finish it now: the one it ran on died, or none is reachable.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class NotOnReplicaYet(Exception):
    """The ingress lists the model, the generator replica that got the request does not: Serve reconfigures the
    ingress and the generators apart (the replicas a fifth at a time, none while the deployment scales down), so a
    deploy reaches every replica a while after the ingress (and an undeploy may reach a replica first)."""


class TenantBusy(Exception):
    """The caller's tenant has max_requests_per_tenant requests in the ingress already."""


def render(model_id: str, encoded: EncodedResult, output_format: str) -> Response:
    headers = {"X-Batch-Size": str(encoded.result.batch_size), "X-Seed": str(encoded.result.seeds[0])}
    if output_format == "png":
        return Response(encoded.png[0], media_type="image/png", headers=headers)
    return JSONResponse(json_response(model_id, encoded).model_dump(), headers=headers)


def served_model(model_id: str, path: Path, config: ServeConfig) -> ServedModel:
    try:
        metadata = ModelMetadata.read(path)
        return ServedModel(
            model_id=model_id,
            endpoint=config.endpoint(model_id),
            # The label the metrics give its requests (but for their "other", past so many classes).
            model_class=class_label(metadata.class_prompt or "", set()),
            class_prompt=metadata.class_prompt or None,
            instance_prompt=metadata.instance_prompt or None,
            # Not the rest of metadata.json: it names paths on the cluster's storage, which clients have no use for.
            resolution=metadata.resolution,
        )
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable, not JSON, or not the shape it should be
        # Listed all the same: one model's bad file must not fail the ingress's reconfigure, which Serve answers by
        # stopping the replica, for every model. Its requests get 503 when it does not load.
        logger.exception("model %s: cannot read the metadata in %s; listed with defaults", model_id, path)
        return ServedModel(model_id=model_id, endpoint=config.endpoint(model_id), model_class="unknown", resolution=512)


class ApiError(HTTPException):
    """An error answer of this API: its body carries a machine-readable `code` beside `detail` (ErrorBody)."""

    def __init__(self, status_code: int, code: ErrorCode, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(status_code, detail=detail, headers=headers)
        self.code = code


def _unauthenticated(error: Unauthenticated) -> ApiError:
    return ApiError(401, "unauthenticated", str(error), headers={"WWW-Authenticate": "Bearer"})


def _not_found(model_id: str) -> ApiError:
    return ApiError(404, "not_found", f"model {model_id!r} is not deployed; GET /v1/models lists them")


def _too_large() -> ApiError:
    return ApiError(413, "too_large", f"the request body is over {MAX_BODY_BYTES} bytes, the most this API reads")


def _too_slow(timeout_s: float) -> ApiError:
    return ApiError(408, "timeout", f"the request body did not arrive within {timeout_s:g} s of its headers")


def replica_message(error: Exception) -> str:
    """The message of an error a generator replica raised: through Ray, the error is a RayTaskError subclassing the
    replica's, whose str is the replica's traceback; its `cause` is the replica's error."""
    return str(getattr(error, "cause", error))


def error_response(
    status_code: int, code: ErrorCode, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status_code, headers=headers)


def sent_as_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON: it validates any other as raw bytes."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def validation_problem(error: dict[str, Any]) -> dict[str, Any]:
    # Not pydantic's `input`, which echoes the body back: JSON cannot encode a number parsed as NaN or infinity
    # (1e400), and re-encoding a list nested a thousand deep overflows the stack (both were 500s).
    problem = {"type": error["type"], "loc": list(error["loc"]), "msg": error["msg"]}
    if error.get("ctx"):
        problem["ctx"] = {key: str(value) for key, value in error["ctx"].items()}
    return problem


def unreadable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not read a JSON body: it says "There was an error parsing the body" whatever the cause."""
    if isinstance(cause, UnicodeDecodeError):
        return "not UTF-8: send the JSON encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "nested too deep to parse"
    return "not readable as JSON"


# The errors that FastAPI and Starlette answer before a handler runs.
FRAMEWORK_ERROR_CODES: dict[int, ErrorCode] = {
    400: "invalid_argument",
    404: "not_found",
    405: "method_not_allowed",
}

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
UNAUTHENTICATED = {401: {"model": ErrorBody, "description": "Tenants are configured and no valid bearer token came."}}
NOT_FOUND = {404: {"model": ErrorBody, "description": "No such model is deployed (another tenant's is not found)."}}
# Not FastAPI's default 422 body (HTTPValidationError): the ingress answers every 422 with an ErrorBody (unprocessable).
UNPROCESSABLE_PARAMETERS = {
    422: {"model": ErrorBody, "description": "A parameter of the wrong type, or out of its bounds (page_size)."}
}
GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}},
        "description": "PNG (output_format png) or JSON",
        "headers": {
            "X-Seed": {"description": "The first image's seed (image i: seed + i).", "schema": {"type": "integer"}},
            "X-Batch-Size": {
                "description": "The most requests that shared one of this request's UNet forwards.",
                "schema": {"type": "integer"},
            },
        },
    },
    400: {"model": ErrorBody, "description": "A field out of bounds, or a body that is not UTF-8 JSON."},
    **UNAUTHENTICATED,
    **NOT_FOUND,
    408: {"model": ErrorBody, "description": "The body was not all there body_timeout_s after the headers."},
    413: {
        "model": ErrorBody,
        "description": f"The body is over {MAX_BODY_BYTES} bytes, or the request ran out of the device's memory with "
        "nothing else on the device (ask for fewer or smaller images: num_images, width, height).",
    },
    422: {"model": ErrorBody, "description": "Not a GenerateBody: not JSON, or a field of the wrong type or name."},
    429: {
        "model": ErrorBody,
        "description": "The tenant has max_requests_per_tenant requests in progress (code throttled).",
        "headers": RETRY_AFTER,
    },
    503: {
        "model": ErrorBody,
        "description": "Overloaded, the model cannot be loaded now, or the request's replica went away.",
        "headers": RETRY_AFTER,
    },
}

# serve.ingress serializes the class when it decorates it: whatever the handlers use is defined above.
api = FastAPI(
    title="dreambooth-cluster serving",
    description="Generate images of personalised subjects (DreamBooth models trained by the controller).",
    version="1",
)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if isinstance(error, ApiError):
        return error_response(error.status_code, error.code, error.detail, error.headers)
    detail = error.detail
    if error.status_code == 400:  # a body FastAPI could not parse, said as the handler's 400s say a field's problem
        detail = {"field": "body", "message": unreadable_body(error.__cause__)}
    code = FRAMEWORK_ERROR_CODES.get(error.status_code, "error")
    return error_response(error.status_code, code, detail, error.headers)


@api.exception_handler(RequestValidationError)
async def unprocessable(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [validation_problem(e) for e in error.errors()]
    of_body = [problem for problem in problems if problem["loc"][:1] == ["body"]]
    if of_body and not sent_as_json(request.headers.get("content-type", "")):
        # curl -d sends a form's type: FastAPI said only "Input should be a valid dictionary" of the bytes. A query
        # parameter's problem is said as it is (a GET has no body to send as JSON).
        message = "send the body as JSON, with `Content-Type: application/json`"
        content_type = {"type": "content_type", "loc": ["header", "content-type"], "msg": message}
        problems = [content_type] + [problem for problem in problems if problem not in of_body]
    return error_response(422, "invalid_argument", problems)


class BodyCap:
    """413 for a body over MAX_BODY_BYTES, announced (Content-Length: refused unread) or counted as it arrives (FastAPI
    reads a body whole before its handler checks the token), and 408 for one not all there `body_timeout_s` after
    the headers: Serve hands the ingress a request with its headers, and bodies sent a byte at a time held all its
    slots, every tenant's requests queueing behind them. Where tenants are configured, a generate request's body
    comes only with a valid token: 401 before it is read (callers with none held those slots too). Not
    FastAPI's max_body_size: it answers an announced one "Content Too Large" in plain text, over whatever the
    handlers said."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        announced = headers.get("content-length", "")
        refusal = _too_large() if announced.isdigit() and int(announced) > MAX_BODY_BYTES else None
        # The replica's ingress, as Serve hands it to the handlers (`self`): what it was configured with.
        ingress = serve.get_replica_context().servable_object
        generating = _GENERATE_PATH.fullmatch(scope["path"]) if scope["method"] == "POST" else None
        if refusal is None and generating is not None:
            scheme, token = get_authorization_scheme_param(headers.get("authorization"))  # as HTTPBearer reads it
            try:
                ingress.access.tenant(token if scheme.lower() == "bearer" else None)
            except Unauthenticated as e:
                refusal = _unauthenticated(e)
                model = ingress.models.get(generating["model_id"])  # counted as the handler counts its refusals
                ingress.metrics.record((model.class_prompt or "") if model else "", "unauthenticated", 0.0, 0)
        if refusal is not None:
            response = await http_error(Request(scope), refusal)
            await response(scope, receive, send)
            return
        received, body_done = 0, False
        timeout_s = ingress.config.body_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s

        async def receive_capped() -> Message:
            nonlocal received, body_done
            if body_done:  # what follows the body (a disconnect) is waited for as long as the request runs
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _too_slow(timeout_s) from None  # through FastAPI's body parsing to http_error
            body_done = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _too_large()
            return message

        await self.app(scope, receive_capped, send)


_GENERATE_PATH = re.compile(r".*/v1/models/(?P<model_id>[^/]+)/generate")  # behind any route_prefix
api.add_middleware(BodyCap)


# A security scheme rather than a header parameter: OpenAPI leaves out header parameters named Authorization, so
# the docs' "Try it out" never sent a token. auto_error=False: without tenants serving is open; Access answers 401s.
bearer = HTTPBearer(auto_error=False, description="The tenant's controller token, where tenants are configured.")


async def bearer_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str | None:
    """None without an `Authorization: Bearer ...` header."""
    return credentials.credentials if credentials else None


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, config: dict[str, Any]):
        keep_replica_grpc_on_loopback()
        self.config = ServeConfig.from_dict(config)
        self.generator = generator
        self.models: dict[str, ServedModel] = {}
        self.paths: dict[str, str] = {}  # model id -> the directory its listing was read from
        self.access = Access()
        self.metrics = IngressMetrics()
        self._in_flight: collections.Counter[str] = collections.Counter()  # by tenant: its requests in this ingress

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Only the models deployed anew or moved have their metadata read: every deploy and undeploy reconfigures,
        # and reading thousands of models' files from the shared storage each time took seconds.
        paths = dict(user_config.get("models", {}))
        self.models = {
            model_id: self.models[model_id]
            if self.paths.get(model_id) == path
            else served_model(model_id, Path(path), self.config)
            for model_id, path in paths.items()
        }
        self.paths = paths
        self.access = Access.from_user_config(user_config)

    @api.get("/healthz")
    def health(self) -> dict[str, str]:
        # No more: its callers are not authenticated, and a count of the models would be over every tenant's.
        return {"status": "ok"}

    @api.get("/v1/models", responses=UNAUTHENTICATED | UNPROCESSABLE_PARAMETERS)
    def list_models(
        self,
        token: str | None = Depends(bearer_token),
        page_size: int = Query(100, ge=1, le=1000),
        page_token: str = "",
    ) -> ModelPage:
        """A page at a time: a replica may serve thousands of models, and one answer of them all was megabytes."""
        tenant = self._tenant(token)
        after = sorted(i for i in self.models if i > page_token and self.access.visible(tenant, i))
        page = after[:page_size]
        return ModelPage(
            models=[self.models[i] for i in page], next_page_token=page[-1] if len(after) > page_size else ""
        )

    @api.get("/v1/models/{model_id}", responses=UNAUTHENTICATED | NOT_FOUND | UNPROCESSABLE_PARAMETERS)
    def get_model(self, model_id: str, token: str | None = Depends(bearer_token)) -> ServedModel:
        return self._served(model_id, self._tenant(token))

    @api.post("/v1/models/{model_id}/generate", response_model=GenerateResponse, responses=GENERATE_RESPONSES)
    async def generate(self, model_id: str, body: GenerateBody, token: str | None = Depends(bearer_token)):
        start = time.perf_counter()
        model = self.models.get(model_id)
        class_prompt = (model.class_prompt or "") if model else ""
        outcome, images = "error", 0
        try:
            tenant = self.access.tenant(token)  # first: without a token, no answer says which ids exist
            if model is None or not self.access.visible(tenant, model_id):
                raise ModelNotServed(model_id)
            request = to_generation_request(body, self.config.limits, default_size=model.resolution)
            with self._turn_of(tenant):
                try:
                    encoded = await self.generator.options(multiplexed_model_id=model_id).generate.remote(request)
                except ModelNotServed as e:
                    raise NotOnReplicaYet(model_id) from e
            outcome, images = "ok", len(encoded.png)
        except Unauthenticated as e:
            outcome = "unauthenticated"
            raise _unauthenticated(e) from e
        except InputError as e:
            outcome = "bad_request"
            raise ApiError(400, "invalid_argument", {"field": e.field, "message": e.message}) from e
        except ModelNotServed as e:
            outcome = "not_found"
            raise _not_found(model_id) from e
        except NotOnReplicaYet as e:  # a 404 would tell its client the model is not there: it is on its way
            outcome = "unavailable"
            why = f"model {model_id!r} is being deployed or undeployed on the replicas"
            raise self._retry_later(503, "model_unavailable", why) from e
        except TenantBusy as e:
            outcome = "throttled"
            raise self._retry_later(429, "throttled", str(e)) from e
        except BackPressureError as e:
            outcome = "overloaded"
            raise self._retry_later(503, "overloaded", "overloaded") from e
        except ModelUnavailable as e:  # its files: the operator's to fix (the replica logged why; no paths here)
            outcome = "unavailable"
            why = f"model {model_id!r} cannot be loaded now"
            raise self._retry_later(503, "model_unavailable", why, getattr(e, "retry_after_s", 0)) from e
        except TooLargeForDevice as e:  # alone it outgrew the GPU: it would on every retry
            outcome = "bad_request"
            raise ApiError(413, "too_large", replica_message(e)) from e
        except OutOfDeviceMemory as e:  # its batch outgrew the GPU: beside fewer requests it may fit
            outcome = "overloaded"
            raise self._retry_later(503, "overloaded", "the device ran out of memory for this request's batch") from e
        except REPLICA_LOST as e:
            # Its replica died under it (out of memory, node lost) or none is up yet: Serve starts another, so the
            # same request can succeed in a moment; a 500 would tell clients not to retry.
            outcome = "unavailable"
            raise self._retry_later(503, "unavailable", "the replica serving this request went away") from e
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client went away (Serve cancels its request): not a server error
            raise
        finally:
            self.metrics.record(class_prompt, outcome, time.perf_counter() - start, images)
        return render(model_id, encoded, body.output_format)

    def _retry_later(self, status_code: int, code: ErrorCode, why: str, not_before_s: float = 0) -> ApiError:
        """`not_before_s`: how long the replica refuses what was asked (a model whose load failed), if longer than
        the configured retry_after_s."""
        headers = {"Retry-After": str(max(self.config.retry_after_s, math.ceil(not_before_s)))}
        return ApiError(status_code, code, f"{why}; retry later", headers=headers)

    def _turn_of(self, tenant: str | None) -> contextlib.AbstractContextManager[None]:
        """One of the tenant's max_requests_per_tenant turns while the block runs (TenantBusy if none is free); no
        limit without tenants."""
        limit = self.config.max_requests_per_tenant if tenant is not None else math.inf
        message = f"your tenant has {limit} requests in progress, the most it may (max_requests_per_tenant)"
        return counted(self._in_flight, tenant, limit, lambda _: TenantBusy(message))

    def _tenant(self, token: str | None) -> str | None:
        try:
            return self.access.tenant(token)
        except Unauthenticated as e:
            raise _unauthenticated(e) from e

    def _served(self, model_id: str, tenant: str | None) -> ServedModel:
        if model_id not in self.models or not self.access.visible(tenant, model_id):
            raise _not_found(model_id)
        return self.models[model_id]


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (`import_path: serving.app:build_app`); `args` is a ServeConfig dict."""
    config = ServeConfig.from_dict(args)
    replicas: dict[str, Any] = {"num_replicas": config.min_replicas}
    if config.max_replicas > config.min_replicas:
        replicas = {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": config.min_replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            },
        }
    generator = Generator.options(
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        # A replica going away (downscaling) first finishes its requests: Serve's default gives them 20 s, less
        # than a request at the limits takes.
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        **replicas,
    ).bind(config.to_dict())
    # The ingress only awaits the generators: cheap, so it admits everything they may queue.
    admitted = config.max_queued_requests + config.max_ongoing_requests * config.max_replicas
    return Ingress.options(
        ray_actor_options={"num_cpus": 0},
        # It holds each HTTP request for the whole of its generation: replaced (a redeploy with new settings), it
        # waits for them as long as a generator would.
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        max_ongoing_requests=max(100, 2 * admitted),
        max_queued_requests=max(100, 2 * admitted),  # Serve's default is no bound: beyond it, 503 from Serve's proxy
    ).bind(generator, config.to_dict())
