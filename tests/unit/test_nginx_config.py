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


def test_the_per_address_limit_covers_posting_intents_only_and_is_off_by_default():
    plain = render_config(Path("/p"), 8080, [8081], Path("/m.so"))
    assert "limit_req" not in plain
    limited = render_config(Path("/p"), 8080, [8081], Path("/m.so"), (2.5, 7))
    assert "limit_req_zone $binary_remote_addr zone=intents_by_addr:10m rate=150r/m;" in limited
    locations = {k.strip(): v for k, v in _locations(limited).items()}
    intents = locations[r"~ ^/v1/sales/[^/]+/intents$"]
    assert "limit_req zone=intents_by_addr burst=7 nodelay;" in intents
    assert 'proxy_set_header Connection "";' in intents and "proxy_pass" in intents
    assert [k for k, v in locations.items() if "limit_req " in v] == [
        r"~ ^/v1/sales/[^/]+/intents$"
    ]
