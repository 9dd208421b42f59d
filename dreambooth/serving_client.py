"""A small HTTP client of the serving API (serving/http_api.py): the standard library, and serving/config.py's
constants.

    model = client.deploy(model_id)                    # the gRPC SDK: returns the model's endpoint
    wait_until_served(model.endpoint, token=TOKEN)
    [image] = generate(model.endpoint, "a photo of sks dog on the beach", token=TOKEN)  # image.png, image.seed

`token`: the tenant's bearer token, the same as the controller's (None where no tenants are configured).
`tls_ca`: for an https endpoint whose certificate a private CA signed, that CA's certificate file (the CLI passes
the controller's, --tls-ca or $DREAMBOOTH_TLS_CA), trusted besides the system's CAs. A token sent over plain http://
to another machine is warned of on stderr, once. The environment's HTTP proxy (http_proxy, ...) is used but for
loopback addresses.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import http.client
import ipaddress
import itertools
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from dreambooth.errors import InputError
from serving.config import LOAD_TIMEOUT_S, SAMPLING_S

GENERATE_TIMEOUT_S = LOAD_TIMEOUT_S + SAMPLING_S
"""generate's default: a request waits up to LOAD_TIMEOUT_S for its model's load (then the server answers 503),
and may then sample for up to SAMPLING_S. At LOAD_TIMEOUT_S alone, the client gave
up just before the server's answer."""
SYSTEM_CAS = "system"
"""As `tls_ca` (here and for the controller's SDK client): TLS, trusting the system's certificate authorities."""
RETRIES = 3
"""generate's default: a 429 or 503 (throttled, overloaded, its model not loadable now), or an answer cut off, is sent
again this many times, after its Retry-After: generating has no side effects."""
MAX_RETRY_WAIT_S = 30.0
"""The longest a retry waits, whatever Retry-After says (a load balancer's may say minutes)."""
RETRY_WAIT_S = 1.0
"""A retry's wait when the answer has no Retry-After (a proxy's 503, say)."""


@dataclass(frozen=True)
class GeneratedImage:
    """One image of a generate call: its PNG file, and the seed that draws it again (with the same request)."""

    png: bytes
    seed: int


class ServingUnreachable(OSError):
    """No answer from the serving API's address (nothing listens, refused, the connection timed out)."""


class ServingHostUnknown(ServingUnreachable):
    """The serving API's host name does not resolve here (a cluster's internal name, from outside it): not retried,
    as waiting does not change that."""


class ServingDisconnected(ServingUnreachable):
    """The serving API's answer was cut off (a proxy, a replica or a load balancer closed the connection before its
    end): generate sends the request again, as after a 503."""


class ServingTLSError(OSError):
    """TLS with the serving API failed: its certificate is not trusted (give the CA that signed it), or it does not
    speak TLS. Not retried: waiting changes nothing."""


class ServingTimeout(TimeoutError):
    """The serving API took the request but did not answer within the client's timeout."""


class ServingError(Exception):
    """An HTTP error from the serving API: `status`, the server's detail and its machine-readable `code`
    (serving/http_api.ErrorCode; None from something else at that address, a proxy say). `status` 0: the answer was
    not HTTP (not the serving API at that address)."""

    def __init__(self, status: int, detail: Any, retry_after_s: float | None = None, code: str | None = None):
        # The serving API's 400s name the field to fix, as the controller's errors do.
        named = isinstance(detail, dict) and {"field", "message"} <= detail.keys()
        text = f"{detail['field']}: {detail['message']}" if named else f"{detail}"
        super().__init__(f"HTTP {status}: {text}" if status else text)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.code = code


def check_token(token: str | None) -> str | None:
    """The token without surrounding whitespace (a Kubernetes Secret's value often ends in a newline), for the
    controller and the serving API alike. Any other character outside printable ASCII is refused: gRPC refuses it in
    metadata ("INTERNAL: Invalid metadata", which never passes), http.client in a header (its error shows it)."""
    token = token.strip() if token else None
    for position, character in enumerate(token or "", 1):
        if not " " <= character <= "~":
            raise InputError(
                "token",
                f"character {position} of {len(token)} is U+{ord(character):04X}, and a token is printable ASCII: "
                "copy it again (--token or $DREAMBOOTH_TOKEN)",
            )
    return token or None


def generate(
    endpoint: str,
    prompt: str,
    token: str | None = None,
    timeout_s: float = GENERATE_TIMEOUT_S,
    retries: int = RETRIES,
    tls_ca: str | os.PathLike | None = None,
    **options: Any,
) -> list[GeneratedImage]:
    """Each generated image with its seed (image i: seed + i). `options`: negative_prompt, num_images, steps,
    guidance_scale, seed, width, height (see GenerateBody); without a seed (or None) one is chosen here, so that
    every try of the request draws the same images, and returned. A 429 or 503 is retried up to `retries` times,
    each after its Retry-After (at most MAX_RETRY_WAIT_S), and so is a 408 (the body stalled on its way: the link's,
    not the request's fault) and an answer cut off (ServingDisconnected); the last one raises."""
    if options.get("seed") is None:
        options["seed"] = secrets.randbelow(2**31)  # as the server chooses one
    data = json.dumps({"prompt": prompt, **options, "output_format": "json"}).encode()
    for attempt in itertools.count(1):
        try:
            reply = _request(endpoint, data, token, timeout_s, tls_ca)
        except (ServingError, ServingDisconnected) as e:
            retryable = isinstance(e, ServingDisconnected) or e.status in (408, 429, 503)
            if not retryable or attempt > retries:
                raise
            wait_s = getattr(e, "retry_after_s", None)
            time.sleep(min(RETRY_WAIT_S if wait_s is None else wait_s, MAX_RETRY_WAIT_S))
            continue
        try:
            return [
                GeneratedImage(base64.b64decode(image["png_base64"]), int(image["seed"])) for image in reply["images"]
            ]
        except (KeyError, TypeError, ValueError) as e:  # a 200 from another service at that address
            raise ServingError(
                200, f"the answer of {endpoint} holds no images, so it is not the serving API: {str(reply)[:200]}"
            ) from e


def wait_until_served(
    endpoint: str, token: str | None = None, timeout_s: float = 300, tls_ca: str | os.PathLike | None = None
) -> None:
    """Blocks until the serving API lists the model of `endpoint` (replicas reconfigure a moment after Deploy). What
    waiting does not change is raised at once: a refusal (ServingError 401, 403), TLS failing (ServingTLSError), a
    host name that does not resolve here (ServingHostUnknown)."""
    model_url = endpoint.removesuffix("/generate")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _request(model_url, None, token, 10, tls_ca)
            return
        except (ServingTLSError, ServingHostUnknown):
            raise
        except (ServingError, OSError) as e:  # 404 until reconfigured; 503 or refused/reset while Serve starts
            if isinstance(e, ServingError) and e.status not in (404, 502, 503, 504):
                raise  # a wrong token (401), refused (403): waiting changes nothing
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model_url} not served after {timeout_s:.0f} s: {e}") from e
        time.sleep(0.5)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds from now: RFC 9110 allows a number of seconds or an HTTP date (a load
    balancer may send one). None when there is none, or it is neither."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # the obsolete asctime form, which has no zone: HTTP dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _request(
    url: str, data: bytes | None, token: str | None, timeout_s: float, tls_ca: str | os.PathLike | None
) -> Any:
    token = check_token(token)
    if token:
        _warn_of_cleartext_token(url)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=data, headers=headers)
    context = ssl.create_default_context()
    if tls_ca not in (None, SYSTEM_CAS):  # besides the system's: the controller's private CA, a public Ingress's
        context.load_verify_locations(cafile=tls_ca)
    try:
        with _opener(url, context).open(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read())
            detail = answer["detail"]
        except (ValueError, KeyError, TypeError, http.client.HTTPException, OSError):  # not the serving API's JSON
            # (a proxy's page, say), or cut off: the status says enough
            answer, detail = {}, e.reason
        retry_after_s = retry_after_seconds(e.headers.get("Retry-After"))
        raise ServingError(e.code, detail, retry_after_s, answer.get("code")) from e
    except (http.client.IncompleteRead, ConnectionError) as e:  # closed (FIN or RST) before the answer's end
        # Not URLError: urllib wraps the errors of connecting and sending; these came after the request was sent.
        raise ServingDisconnected(
            f"the serving API at {url} closed the connection before the end of its answer ({e!r}; a proxy "
            "or a replica dropped it)"
        ) from e
    except http.client.HTTPException as e:  # not HTTP (BadStatusLine: SSH, say), or not what HTTP allows
        raise ServingError(0, f"{url} does not answer as an HTTP server ({e!r}), so it is not the serving API") from e
    except TimeoutError as e:  # connected and sent, but no answer in time (urllib wraps a connect timeout in URLError)
        raise ServingTimeout(
            f"the serving API at {url} took the request but did not answer within {timeout_s:g} s"
        ) from e
    except (urllib.error.URLError, OSError) as e:  # refused, reset, the connection timed out: no answer at all
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, ssl.SSLError):
            raise ServingTLSError(
                f"TLS with the serving API at {url} failed: {reason}; if a private CA signed its certificate, give "
                "that CA's certificate (tls_ca; the CLI's --tls-ca or $DREAMBOOTH_TLS_CA)"
            ) from e
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(url).hostname
            raise ServingHostUnknown(f"{host}, the host of {url}, cannot be resolved from here ({reason})") from e
        raise ServingUnreachable(f"no answer from the serving API at {url}: {reason}") from e
    try:
        return json.loads(body)
    except ValueError as e:  # something else answers at that address
        raise ServingError(response.status, f"not the serving API's JSON: {body[:200]!r}") from e


def is_loopback(host: str | None) -> bool:
    """Whether `host` (a name, or an address: IPv6 without brackets) is this machine's loopback."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener(url: str, context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """urllib's opener for `url`. The environment's HTTP proxy (http_proxy, ...) is for hosts beyond this machine: a
    loopback address sent through it (no_proxy often names localhost, not 127.0.0.1) got the proxy's 502, and the
    proxy got the prompt and the token."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=context)]
    if is_loopback(urllib.parse.urlsplit(url).hostname):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


_CLEARTEXT_TOLD = threading.Event()  # once per process: a script generating hundreds of images is told once


def _warn_of_cleartext_token(url: str) -> None:
    """The token is the tenant's (it cancels and deletes its jobs): over plain http:// beyond this machine, anyone on
    the way reads it. A warning, not a refusal: a network of one's own may be trusted."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not _CLEARTEXT_TOLD.is_set():
        _CLEARTEXT_TOLD.set()
        print(
            f"warning: the bearer token goes to {parts.hostname} over plain http://, readable on the network: an "
            "https:// address for the serving API (the controller's serving.public_url) keeps it private",
            file=sys.stderr,
        )
