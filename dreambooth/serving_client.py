"""A small HTTP client of the serving API (serving/http_api.py), standard library only.

    model = client.deploy(model_id)                    # the gRPC SDK: returns the model's endpoint
    wait_until_served(model.endpoint, token=TOKEN)
    png = generate(model.endpoint, "a photo of sks dog on the beach", token=TOKEN, seed=3)[0]

`token`: the tenant's bearer token, the same as the controller's (None where no tenants are configured).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from typing import Any


class ServingUnreachable(OSError):
    """No answer from the serving API's address (nothing listens, refused, timed out)."""


class ServingError(Exception):
    """An HTTP error from the serving API: `status` and the server's detail."""

    def __init__(self, status: int, detail: Any, retry_after_s: float | None = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


def generate(
    endpoint: str, prompt: str, token: str | None = None, timeout_s: float = 600, **options: Any
) -> list[bytes]:
    """PNG bytes of each generated image. `options`: negative_prompt, num_images, steps, guidance_scale, seed,
    width, height (see GenerateBody)."""
    body = {"prompt": prompt, **options, "output_format": "json"}
    reply = _request(endpoint, json.dumps(body).encode(), token, timeout_s)
    return [base64.b64decode(image["png_base64"]) for image in reply["images"]]


def wait_until_served(endpoint: str, token: str | None = None, timeout_s: float = 300) -> None:
    """Blocks until the serving API lists the model of `endpoint` (replicas reconfigure a moment after Deploy)."""
    model_url = endpoint.removesuffix("/generate")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _request(model_url, None, token, timeout_s=10)
            return
        except (ServingError, OSError) as e:  # 404 until reconfigured; 503 or refused/reset while Serve starts
            if isinstance(e, ServingError) and e.status not in (404, 502, 503, 504):
                raise  # a wrong token (401), refused (403): waiting changes nothing
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model_url} not served after {timeout_s:.0f} s: {e}") from e
        time.sleep(0.5)


def _request(url: str, data: bytes | None, token: str | None, timeout_s: float) -> Any:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read())["detail"]
        except (ValueError, KeyError, TypeError):  # not the serving API's JSON (a proxy's page, say)
            detail = e.reason
        retry_after = e.headers.get("Retry-After")
        raise ServingError(e.code, detail, float(retry_after) if retry_after else None) from e
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out: no answer at all
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise ServingUnreachable(f"no answer from the serving API at {url}: {reason}") from e
    try:
        return json.loads(body)
    except ValueError as e:  # something else answers at that address
        raise ServingError(response.status, f"not the serving API's JSON: {body[:200]!r}") from e
