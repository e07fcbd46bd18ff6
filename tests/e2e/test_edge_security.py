"""The edge's keys and transport: token keys rotate on running app servers (the operator's
`flashsale token rotate` makes a new key sign, tokens of both keys are accepted during the
overlap, `token retire` makes every server refuse the old key's tokens within a second or
two; no server restarts), and nginx terminates TLS with the certificate set-up made."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flashsale.settings import REPO_ROOT
from producers.http.auth import load_keyring, token
from tests.e2e.harness import EdgeUnderTest, start_edge, wait_for
from tests.integration.pipeline import Pipeline


@pytest.fixture(scope="module")
def keyed_edge(pipeline: Pipeline, tmp_path_factory) -> Iterator[tuple[EdgeUnderTest, Path]]:
    """An edge with a keyring of its own (not a fixed secret) and HTTPS."""
    keys = tmp_path_factory.mktemp("edge") / "jwt-keys"
    load_keyring(keys.parent, None, keys)  # as `make up` has it before its servers start
    edge = start_edge(pipeline, 2, https=True, FLASHSALE_JWT_SECRET="",
                      FLASHSALE_JWT_KEYS_DIR=str(keys))  # fmt: skip
    yield edge, keys
    edge.edge.down()


def _cli(keys: Path, *args: str) -> str:
    env = {**os.environ, "FLASHSALE_JWT_KEYS_DIR": str(keys)}
    env.pop("FLASHSALE_JWT_SECRET", None)
    done = subprocess.run([sys.executable, "-m", "flashsale.cli", "token", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_nginx_terminates_tls_with_the_local_certificate(keyed_edge):
    edge, _ = keyed_edge
    https = edge.edge.nginx.https_url
    assert https is not None
    cert = edge.edge.nginx.certificate
    with httpx.Client(verify=str(cert), timeout=10) as client:
        assert client.get(f"{https}/healthz").status_code == 200
        assert client.get(f"{https}/metrics").status_code == 404  # private over TLS too
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https}/healthz", timeout=10)  # not a certificate anyone else trusts
    assert httpx.get(edge.url + "/healthz", timeout=10).status_code == 200  # HTTP still served
    assert cert.with_name("key.pem").stat().st_mode & 0o777 == 0o600


def test_rotation_and_retirement_take_effect_on_running_servers(keyed_edge):
    edge, keys = keyed_edge
    pids = [s.pid() for s in edge.edge.servers]
    old = _cli(keys, "issue", "--user", "op", "--role", "admin")
    url = f"{edge.url}/v1/admin/sales/no-such-sale/close"

    def statuses(tok: str) -> set[int]:  # a few requests: nginx spreads them over both
        with httpx.Client(timeout=10) as client:
            return {client.post(url, headers={"Authorization": f"Bearer {tok}"}).status_code
                    for _ in range(6)}  # fmt: skip

    assert statuses(old) == {404}  # authenticated (the sale does not exist)
    assert "signing with k2" in _cli(keys, "rotate")
    new = _cli(keys, "issue", "--user", "op", "--role", "admin")
    assert wait_for(lambda: statuses(new) == {404}, 5), "the new key was not taken up"
    assert statuses(old) == {404}, "the old key's tokens must stay valid until retired"
    _cli(keys, "retire", "--kid", "k1")
    assert wait_for(lambda: statuses(old) == {401}, 5), "the retired key is still accepted"
    assert statuses(new) == {404}
    assert "k2 (signing)" in _cli(keys, "keys")
    assert [s.pid() for s in edge.edge.servers] == pids, "a server restarted"
    forged = token("op", "admin", 600, "x" * 48)  # no key id, not the current key
    assert statuses(forged) == {401}
