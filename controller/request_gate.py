"""The controller's admission gate: the tenant a call's token names (Authenticator), and which calls are let in
(RequestGate): a gRPC server interceptor that refuses, from a call's metadata and before gRPC reads its request,
unknown tokens and a tenant's calls beyond its limits. Apart from the handlers (controller/api.py), which it runs
in front of, holding each call's turn."""

from __future__ import annotations

import collections
import contextlib
import functools
import hmac
import threading
from collections.abc import Iterator

import grpc

from controller import grpc_errors, metrics
from controller.errors import Unauthenticated
from controller.service import JobService


class Authenticator:
    """Bearer token -> tenant. With no tenants configured, everyone is tenant "default" (local use)."""

    def __init__(self, service: JobService, open_access: bool):
        self._tokens = [(token, t.name) for t in service.tenants.values() for token in t.tokens]
        self._open = open_access

    def tenant(self, context: grpc.ServicerContext) -> str:
        return self.tenant_of(context.invocation_metadata())

    def tenant_of(self, metadata) -> str:
        if self._open:
            return "default"
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send `authorization: Bearer <token>` metadata")
        for known, tenant in self._tokens:
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        raise Unauthenticated("unknown token")


class RequestGate(grpc.ServerInterceptor):
    """Refuses, from a call's metadata and before gRPC reads its request, a call to `services` whose token is
    missing or unknown (UNAUTHENTICATED), and a tenant's call beyond its limit (RESOURCE_EXHAUSTED): of a method in
    `limits` ({method path: (how many of the tenant's may be in progress, the setting that says so)}), or of all the
    other methods together, `other_calls` (a stream's turn ends once its request is read).

    A handler sees its request only after gRPC has received and parsed it, up to max_request_bytes (64 MiB of
    photos, which any method's request may carry in fields it does not know): without the gate, every RPC thread
    could hold that much for callers without a token, and one tenant calling at once on all of them could take the
    controller's memory. A refusal's handler takes the request as a stream it never reads, so gRPC receives no more
    of it than HTTP/2's flow-control window. A stream (server reflection) holds its thread for as long as its caller
    keeps it open: one tenant's must not take them all.

    `open_services` (health: probes have no token) take no token, but all their calls together are at most
    OPEN_CALLS_AT_ONCE at a time, each for its whole duration: requests that never finish arriving held every RPC
    thread, every tenant's calls waiting behind them.
    """

    def __init__(
        self,
        auth: Authenticator,
        services: tuple[str, ...],
        limits: dict[str, tuple[int, str]],
        other_calls: tuple[int, str],
        open_services: tuple[str, ...] = (),
    ):
        self._auth = auth
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._open_prefixes = tuple(f"/{service}/" for service in open_services)
        self._limits = limits
        self._other_calls = other_calls
        self._in_progress = InProgress()  # (method path or _OTHER_CALLS, tenant) -> calls

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is not None and method.startswith(self._open_prefixes):
            return self._open_call(method, handler)
        if not method.startswith(self._prefixes) or handler is None:
            # A method no service has: UNIMPLEMENTED, and no metric series named by the caller (one per made-up name,
            # for ever).
            return handler
        try:
            tenant = self._auth.tenant_of(handler_call_details.invocation_metadata)
        except Unauthenticated as e:
            return _refusal(method.rpartition("/")[2], grpc.StatusCode.UNAUTHENTICATED, str(e))
        turn = functools.partial(self._turn, method, tenant)
        wrap = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._unary_in_turn, handler.unary_unary, method, turn), **wrap
            )
        if handler.unary_stream is not None:  # WatchJob: its stream's thread is bounded by max_watches_per_tenant
            return grpc.stream_stream_rpc_method_handler(
                functools.partial(self._read_in_turn, handler.unary_stream, method, turn), **wrap
            )
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(self._stream_in_turn, handler.stream_stream, turn), **wrap
        )

    def _open_call(self, method: str, handler):
        turn = functools.partial(self._open_turn, method)
        wrap = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._unary_in_turn, handler.unary_unary, method, turn), **wrap
            )
        return grpc.stream_stream_rpc_method_handler(  # health's Watch: its turn lasts as long as its stream
            functools.partial(self._stream_of_one_in_turn, handler.unary_stream, method, turn), **wrap
        )

    @contextlib.contextmanager
    def _open_turn(self, method: str, context) -> Iterator[None]:
        if not self._in_progress.enter((_OPEN_CALLS, ""), OPEN_CALLS_AT_ONCE):
            message = f"{OPEN_CALLS_AT_ONCE} calls without a token are in progress: retry once one has ended"
            status = grpc_errors.status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=1)
            _refuse(method.rpartition("/")[2], status, context)
        try:
            yield
        finally:
            self._in_progress.leave((_OPEN_CALLS, ""))

    def _stream_of_one_in_turn(self, call, method: str, turn, request_stream, context):
        with turn(context):
            yield from call(_one_request(method, request_stream, context), context)

    def _unary_in_turn(self, call, method: str, turn, request_stream, context):
        with turn(context):
            return call(_one_request(method, request_stream, context), context)

    def _read_in_turn(self, call, method: str, turn, request_stream, context):
        with turn(context):
            request = _one_request(method, request_stream, context)
        yield from call(request, context)

    def _stream_in_turn(self, call, turn, request_stream, context):
        with turn(context):
            yield from call(request_stream, context)

    @contextlib.contextmanager
    def _turn(self, method: str, tenant: str, context) -> Iterator[None]:
        key = method if method in self._limits else _OTHER_CALLS
        limit, setting = self._limits.get(method, self._other_calls)
        if not self._in_progress.enter((key, tenant), limit):
            what = f"{method.rpartition('/')[2]} calls" if key == method else "calls other than SubmitJob"
            message = f"tenant {tenant!r} has {limit} {what} in progress ({setting}): retry once one has ended"
            status = grpc_errors.status(
                grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="TENANT_CALLS_LIMIT", retry_after_s=1
            )
            _refuse(method.rpartition("/")[2], status, context)
        try:
            yield
        finally:
            self._in_progress.leave((key, tenant))


_OTHER_CALLS = "other calls"
_OPEN_CALLS = "calls without a token"
OPEN_CALLS_AT_ONCE = 8  # health checks: a probe's is over in a millisecond


def _one_request(method: str, request_stream, context):
    """The call's request, read only now, holding one of the tenant's turns."""
    request = next(request_stream, None)
    if request is None:
        name = method.rpartition("/")[2]
        _refuse(
            name, grpc_errors.status(grpc.StatusCode.INVALID_ARGUMENT, f"{name} takes one request message"), context
        )
    return request


class InProgress:
    """Calls (or streams) in progress by key, each admitted while its key has fewer than a limit."""

    def __init__(self):
        self._counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def enter(self, key, limit: int) -> bool:
        with self._lock:
            if self._counts[key] >= limit:
                return False
            self._counts[key] += 1
            return True

    def leave(self, key) -> None:
        with self._lock:
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]  # tenants and methods come and go: no key kept for each ever seen


def _refusal(name: str, code: grpc.StatusCode, message: str):
    """A handler that ends its call with `code` without reading the request."""
    status = grpc_errors.status(code, message)
    return grpc.stream_stream_rpc_method_handler(lambda request_stream, context: _refuse(name, status, context))


def _refuse(name: str, status: grpc.Status, context: grpc.ServicerContext) -> None:
    if name == "WatchJob":
        metrics.WATCHES_ENDED.labels(code=status.code.name).inc()
    else:
        metrics.record_rpc(name, status.code, 0)
    context.abort_with_status(status)  # raises
