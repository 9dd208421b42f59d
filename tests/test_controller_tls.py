"""The controller with certificates configured speaks TLS only (no Ray needed: nothing is ever scheduled)."""

from __future__ import annotations

import socket

import pytest

from controller.config import ControllerConfig, Tenant
from controller.server import start
from dreambooth.client import ClientError, DreamBoothClient
from tests.test_client import _self_signed_certificate


def test_tls_when_certificates_are_configured(tmp_path):
    cert, key = _self_signed_certificate()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    with socket.socket() as s:  # a port where no Ray dashboard listens: the Jobs client is never used here
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]
    controller = start(
        ControllerConfig(
            storage=tmp_path / "storage",
            listen="127.0.0.1:0",
            ray_dashboard_url=f"http://127.0.0.1:{unused}",
            tenants=(Tenant("alice", ("alice-token",)),),
            metrics_listen="",
            tls_cert=tmp_path / "cert.pem",
            tls_key=tmp_path / "key.pem",
            capacity_cpus=0,
        )
    )
    try:
        with DreamBoothClient(
            f"127.0.0.1:{controller.port}", "alice-token", tls_ca=str(tmp_path / "cert.pem"), timeout_s=10
        ) as client:
            assert list(client.list()) == []
        with DreamBoothClient(f"127.0.0.1:{controller.port}", "alice-token", timeout_s=3) as plaintext:
            with pytest.raises(ClientError) as error:
                list(plaintext.list())
            assert error.value.code == "UNAVAILABLE"
    finally:
        controller.stop(grace_s=1)
