"""The API contract: the generated code in dreambooth/v1/ is what proto/ generates, and proto/ passes buf lint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "dreambooth" / "v1"
# Pinned, so that a new buf release with new rules cannot turn the suite red on its own; installed once per
# machine from the npm registry (the package ships buf's binary) and reused from this cache afterwards.
BUF_VERSION = "1.75.0"
BUF_CACHE = Path.home() / ".cache" / "dreambooth-cluster" / "buf"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_generated_code_is_current(tmp_path):
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        capture_output=True,
    )
    fresh, committed = _files(tmp_path / "dreambooth" / "v1"), _files(GENERATED)
    assert sorted(committed) == sorted(fresh), "dreambooth/v1/ has other files than scripts/gen-proto writes"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"dreambooth/v1/{stale} are stale: run scripts/gen-proto after changing proto/"


def _buf() -> Path:
    """buf from the cache, installing it there first if needed; skips the test when that cannot be done."""
    binary = BUF_CACHE / "node_modules" / ".bin" / "buf"
    manifest = BUF_CACHE / "node_modules" / "@bufbuild" / "buf" / "package.json"
    if binary.exists() and manifest.exists() and json.loads(manifest.read_text())["version"] == BUF_VERSION:
        return binary
    if shutil.which("npm") is None:
        pytest.skip("buf lint needs npm (to install @bufbuild/buf from the npm registry); npm is not installed")
    BUF_CACHE.mkdir(parents=True, exist_ok=True)
    # No retries: without a network (the suite's own network namespace) npm gives up at once.
    command = ["npm", "install", "--prefix", str(BUF_CACHE), "--no-audit", "--no-fund", "--fetch-retries=0"]
    result = subprocess.run([*command, f"@bufbuild/buf@{BUF_VERSION}"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not binary.exists():
        pytest.skip(f"could not install @bufbuild/buf@{BUF_VERSION} from the npm registry: {result.stderr[-500:]}")
    return binary


def test_buf_lint():
    if shutil.which("node") is None:
        pytest.skip("buf lint needs Node.js (the @bufbuild/buf package starts buf through node); it is not installed")
    result = subprocess.run(
        [str(_buf()), "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"buf lint (proto/buf.yaml) found problems:\n{result.stdout}{result.stderr}"
    assert "WARN" not in result.stderr, result.stderr  # e.g. a deprecated setting in buf.yaml


@pytest.mark.parametrize("message", ["Failure", "Queued"])
def test_every_reason_is_documented(message):
    """Failure.reason and Queued.reason are closed sets clients switch on: each one the code knows is in the
    contract's comment of its message."""
    from controller.scheduler import WAITING_REASONS
    from dreambooth.errors import FAILURE_REASONS

    proto = (ROOT / "proto" / "dreambooth" / "v1" / "jobs.proto").read_text()
    start = proto.index(f"message {message} {{")
    comment = proto[start : proto.index("string reason = 1;", start)]
    reasons = {"Failure": FAILURE_REASONS, "Queued": WAITING_REASONS}[message]
    assert [r for r in reasons if r not in comment] == []
