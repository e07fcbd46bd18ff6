"""The load balancer's configuration: upstream keep-alive really in force, streams unbuffered."""

from __future__ import annotations

import re
from pathlib import Path

from infra.nginx import render_config


def _locations(conf: str) -> dict[str, str]:
    return dict(re.findall(r"location ([^{]+)\{([^}]*)\}", conf))


def test_every_proxied_location_keeps_upstream_connections_alive_and_streams_are_unbuffered():
    conf = render_config(Path("/p"), 8080, [8081, 8082], Path("/m.so"))
    proxied = {k.strip(): v for k, v in _locations(conf).items() if "proxy_pass" in v}
    assert {"/", "= /v1/me/events", r"~ ^/v1/sales/[^/]+/events$"} <= set(proxied)
    for where, body in proxied.items():
        # A level that sets any proxy_set_header inherits none: each must clear Connection,
        # or nginx sends "Connection: close" and opens a connection per request.
        assert 'proxy_set_header Connection "";' in body, where
    for where in ("= /v1/me/events", r"~ ^/v1/sales/[^/]+/events$"):
        assert "proxy_buffering off;" in proxied[where], where
    assert "keepalive 128;" in conf and "proxy_http_version 1.1;" in conf
