"""nginx in front of the app servers: config generated under ``state_dir/nginx``.

Routing: ``hash $jwt_sub consistent`` sends every user (the JWT ``sub``, decoded by njs
without verification: routing needs no trust, the app servers verify) to one app server,
so each user's rate-limit bucket lives in one process. When a server fails (passive health:
``max_fails``/``fail_timeout``), only its users move, to the next server on the ring, and
start there with a fresh bucket.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra import processes
from infra.errors import InfraError, MissingBinary

INSTALL = "apt-get install -y nginx libnginx-mod-http-js"
NJS_MODULE_PATHS = (
    Path("/usr/lib/nginx/modules/ngx_http_js_module.so"),
    Path("/usr/share/nginx/modules/ngx_http_js_module.so"),
)

JWT_SUB_JS = """\
// The JWT's `sub` claim for routing only: the signature is checked by the app servers.
function sub(r) {
    var auth = r.headersIn.Authorization || '';
    var m = /^Bearer\\s+[A-Za-z0-9_-]+\\.([A-Za-z0-9_-]+)\\./.exec(auth);
    if (!m) {
        return '';
    }
    try {
        var claims = JSON.parse(Buffer.from(m[1], 'base64url').toString());
        return typeof claims.sub === 'string' ? claims.sub : '';
    } catch (e) {
        return '';
    }
}
export default {sub};
"""

_NOT_FOUND = json.dumps({"error": {"code": "not_found", "message": "no such endpoint"}})
_ERRORS = {
    413: ("body_too_large", "the request body is larger than 4 KiB"),
    429: ("rate_limited", "too many requests"),
    502: ("bad_gateway", "no app server answered; retry with the same Idempotency-Key"),
    503: ("unavailable", "service unavailable; retry with the same Idempotency-Key"),
    504: ("gateway_timeout", "the app server did not answer in time; outcome unknown, retry"),
}


def njs_module() -> Path:
    """Path of the njs dynamic module, or MissingBinary naming the install command."""
    override = os.environ.get("FLASHSALE_NJS_MODULE")
    for path in ([Path(override)] if override else []) + list(NJS_MODULE_PATHS):
        if path.exists():
            return path
    raise MissingBinary(f"the nginx njs module was not found; install it with: {INSTALL}")


def render_config(
    prefix: Path,
    port: int,
    upstreams: Sequence[int],
    module: Path,
    addr_limit: tuple[float, int] | None = None,
    tls_port: int = 0,
) -> str:
    """nginx.conf for a load balancer on 127.0.0.1:port over app servers on ``upstreams``.

    ``addr_limit`` (requests per second, burst) limits ``POST /v1/sales/{id}/intents`` per
    client address at nginx (429 ``rate_limited`` beyond it), before any app server works:
    one person with many accounts, or a bot farm behind one address, gets no more tries than
    the limit. Off by default (benchmarks drive the edge from one address)."""
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;" for p in upstreams
    )
    error_pages = "\n".join(
        f"        location = /_err/{code} {{\n"
        f"            internal;\n"
        f"            default_type application/json;\n"
        f"            return {code} '{json.dumps({'error': {'code': c, 'message': m}})}';\n"
        f"        }}"
        for code, (c, m) in _ERRORS.items()
    )
    pages = "\n".join(f"        error_page {code} /_err/{code};" for code in _ERRORS)
    # proxy_set_header is not inherited by a level that sets any of its own: without
    # Connection "" here nginx sent "Connection: close" and opened a connection to an app
    # server per request (uvicorn's accept and protocol set-up cost more than the request).
    proxy = """\
            proxy_pass http://flashsale_app;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Request-ID $request_id;"""
    tls = ""
    if tls_port:  # the same server over TLS, with the certificate set-up made
        tls = f"""
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        ssl_certificate {prefix}/tls/cert.pem;
        ssl_certificate_key {prefix}/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:tls:10m;
        ssl_session_timeout 1h;"""
    limit_zone = limit_location = ""
    if addr_limit is not None:
        rate, burst = addr_limit
        per_minute = max(1, round(rate * 60))  # nginx takes r/s or r/m (integers)
        zone = f"zone=intents_by_addr:10m rate={per_minute}r/m"
        limit_zone = f"    limit_req_zone $binary_remote_addr {zone};\n    limit_req_status 429;\n"
        limit_location = f"""
        location ~ ^/v1/sales/[^/]+/intents$ {{
            limit_req zone=intents_by_addr burst={burst} nodelay;
{proxy}
        }}
"""
    return f"""\
load_module {module};
daemon off;
worker_processes 1;
# After a reload (the autoscaler's), old workers close the event streams they still hold
# within 10 s; the clients resume with Last-Event-ID on a server still upstream.
worker_shutdown_timeout 10s;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server_tokens off;

{limit_zone}    js_import jwt from {prefix}/jwt.js;
    js_set $jwt_sub jwt.sub;

    upstream flashsale_app {{
        hash $jwt_sub consistent;
{servers}
        keepalive 128;
        keepalive_timeout 60s;  # shorter than the app servers' (75 s): they never close first
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;{tls}
        client_max_body_size 4k;
        client_body_buffer_size 4k;
        client_header_timeout 10s;
        client_body_timeout 10s;
        send_timeout 10s;
        keepalive_timeout 65s;
        keepalive_requests 100000;

        proxy_http_version 1.1;
        proxy_connect_timeout 2s;
        proxy_send_timeout 10s;
        proxy_read_timeout 15s;
        # Only failures to connect move a request to the next server: nginx never resends
        # a POST it already sent (the client retries with its Idempotency-Key instead).
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 2;
{pages}

        location / {{
{proxy}
        }}
{limit_location}
        location = /v1/me/events {{
{proxy}
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
        }}

        location ~ ^/v1/sales/[^/]+/events$ {{
{proxy}
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
        }}

        # Operational endpoints (readiness details, metrics, the live sale page) are for
        # operators, on each app server's own port: never served to the public through the
        # load balancer.
        location ~ ^/(metrics|readyz|live)(/.*)?$ {{
            default_type application/json;
            return 404 '{_NOT_FOUND}';
        }}

{error_pages}
    }}
}}
"""


@dataclass(frozen=True)
class LocalNginx:
    """One nginx master (``daemon off``, our own pid file) under ``state_dir/nginx``."""

    state_dir: Path
    port: int
    upstreams: tuple[int, ...]
    addr_limit: tuple[float, int] | None = None
    tls_port: int = 0  # FLASHSALE_HTTPS_PORT: also serve HTTPS there (0: not)

    @property
    def home(self) -> Path:
        return self.state_dir / "nginx"

    @property
    def conf(self) -> Path:
        return self.home / "nginx.conf"

    @property
    def pidfile(self) -> Path:
        return self.home / "master.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "nginx.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str | None:
        return f"https://127.0.0.1:{self.tls_port}" if self.tls_port else None

    @property
    def certificate(self) -> Path:
        """The local certificate HTTPS clients should trust (made by ``write_config``)."""
        return self.home / "tls" / "cert.pem"

    def ensure_certificate(self) -> Path:
        """A self-signed certificate for 127.0.0.1 and localhost, made once (key 0600)."""
        tls = self.certificate.parent
        if self.certificate.exists() and (tls / "key.pem").exists():
            return self.certificate
        openssl = processes.find_binary(
            "openssl", "FLASHSALE_OPENSSL", "apt-get install -y openssl"
        )
        tls.mkdir(parents=True, exist_ok=True)
        os.chmod(tls, 0o700)
        import subprocess

        made = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "825", "-subj", "/CN=flashsale local edge",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(tls / "key.pem"), "-out", str(self.certificate)],
            capture_output=True, text=True,
        )  # fmt: skip
        if made.returncode != 0:
            raise InfraError(f"openssl could not make the edge's certificate:\n{made.stderr}")
        os.chmod(tls / "key.pem", 0o600)
        return self.certificate

    def binary(self) -> str:
        """The nginx executable, or MissingBinary naming the install command."""
        return processes.find_binary("nginx", "FLASHSALE_NGINX", INSTALL, [Path("/usr/sbin")])

    def write_config(self) -> Path:
        """Generate nginx.conf and the njs script; check the config with ``nginx -t``."""
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        (self.home / "jwt.js").write_text(JWT_SUB_JS)
        if self.tls_port:
            self.ensure_certificate()
        config = render_config(
            self.home, self.port, self.upstreams, njs_module(), self.addr_limit, self.tls_port
        )
        self.conf.write_text(config)
        import subprocess

        check = subprocess.run(
            [self.binary(), "-t", "-q", "-c", str(self.conf), "-p", str(self.home)],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise InfraError(f"nginx rejected {self.conf}:\n{check.stderr}")
        return self.conf

    def pid(self) -> int | None:
        """The master's pid while our nginx runs."""
        pid = processes.read_pid(self.pidfile)
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        return pid if str(self.conf).encode() in cmdline else None

    def answers(self) -> bool:
        """True when something accepts connections on the port."""
        return not processes.port_is_free(self.port)

    def start(self) -> bool:
        """Start unless running; True if started now."""
        if self.pid() is not None:
            return False
        processes.require_free_port(self.port, "nginx", "FLASHSALE_HTTP_PORT")
        if self.tls_port:
            processes.require_free_port(self.tls_port, "nginx (HTTPS)", "FLASHSALE_HTTPS_PORT")
        self.write_config()
        argv = [self.binary(), "-c", str(self.conf), "-p", str(self.home)]
        pid = processes.spawn(argv, self.logfile, self.pidfile)
        if not processes.wait_until(lambda: self.answers() or not processes.alive(pid), 10, 0.05):
            raise InfraError(f"nginx did not listen on {self.port}; see {self.home}/error.log")
        if not processes.alive(pid):
            self.pidfile.unlink(missing_ok=True)
            tail = processes.log_tail(self.home / "error.log")
            raise InfraError(f"nginx exited at start:\n{tail}\n{processes.log_tail(self.logfile)}")
        return True

    def reload(self, upstreams: Sequence[int]) -> LocalNginx:
        """The same nginx over ``upstreams``: the config rewritten and checked, then SIGHUP
        (new workers take new connections; the old ones finish the requests they hold, and
        close streams within ``worker_shutdown_timeout``). Returns the new description."""
        pid = self.pid()
        if pid is None:
            raise InfraError("nginx is not running: nothing to reload")
        new = dataclasses.replace(self, upstreams=tuple(upstreams))
        new.write_config()
        os.kill(pid, signal.SIGHUP)
        return new

    def stop(self) -> bool:
        """Stop (SIGTERM = fast shutdown, then SIGKILL). True if it was running."""
        return processes.stop_tracked(self.pid(), self.pidfile, grace=10.0)
