"""A probe client: where one intent's time goes, seen by a shopper connected through nginx.

Each probe user opens its own event stream (``GET /v1/me/events``), then posts one intent
and records:

* ``ack_ms``: the POST until its ``202`` (edge, Kafka acknowledgement, back);
* ``log_to_client_ms``: the intent's log time (``decided_at`` in the event) until the
  decision's event reached this client (the writer, the app server's feed, SSE, nginx).

The post-sale report (``flashsale report``) draws them with the analytics projection's
log-to-decision latency and the outcomes projection's log-to-row time.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx


@dataclass
class ProbeResult:
    """What the probe measured (milliseconds), and what it could not."""

    ack_ms: list[float] = field(default_factory=list)
    log_to_client_ms: list[float] = field(default_factory=list)
    answered_at_edge: int = 0  # a 409 (sold out): never reached the log
    intent_ids: list[str] = field(default_factory=list)  # answered 202
    failures: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, path: Path) -> ProbeResult | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _one(url: str, sale_id: str, sku: str, user: str, bearer: str, out: ProbeResult,
         lock: threading.Lock, timeout: float) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {bearer}"}
    opened = threading.Event()
    seen: dict[str, float] = {}
    decided_at: dict[str, float] = {}

    def listen(client: httpx.Client) -> None:
        try:
            with client.stream("GET", "/v1/me/events", headers=headers, timeout=timeout) as resp:
                opened.set()
                event = ""
                for line in resp.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "intent":
                        data = json.loads(line[5:])
                        if data.get("decided_at"):
                            seen[data["intent_id"]] = time.time()
                            at = datetime.fromisoformat(data["decided_at"])
                            decided_at[data["intent_id"]] = at.timestamp()
                            return
        except httpx.HTTPError:
            return  # the probe gave up and closed its client: nothing more to hear

    with httpx.Client(base_url=url, timeout=timeout) as client:
        listener = threading.Thread(target=listen, args=(client,), daemon=True)
        listener.start()
        if not opened.wait(timeout):
            raise TimeoutError("the event stream did not open")
        body, key = {"sku": sku, "quantity": 1}, f"{user}-probe"
        for attempt in range(3):  # as a shopper would: retry with the same key
            began = time.perf_counter()
            try:
                answer = client.post(f"/v1/sales/{sale_id}/intents", json=body,
                                     headers={**headers, "Idempotency-Key": key})  # fmt: skip
            except httpx.TransportError:
                if attempt == 2:
                    raise
                continue
            if answer.status_code != 503:
                break
        acked = (time.perf_counter() - began) * 1000
        if answer.status_code == 409:  # sold out, answered by the edge: nothing to follow
            with lock:
                out.answered_at_edge += 1
            return
        if answer.status_code != 202:
            raise RuntimeError(f"POST answered {answer.status_code}: {answer.text[:200]}")
        intent_id = answer.json()["intent_id"]
        with lock:
            out.intent_ids.append(intent_id)
        listener.join(timeout)
        if intent_id not in seen:
            raise TimeoutError(f"no decision event for {intent_id} within {timeout}s")
    with lock:
        out.ack_ms.append(round(acked, 2))
        out.log_to_client_ms.append(round((seen[intent_id] - decided_at[intent_id]) * 1000, 2))


def run_probe(url: str, sale_id: str, skus: list[str], tokens: dict[str, str],
              spacing_s: float = 0.05, timeout: float = 60.0) -> ProbeResult:  # fmt: skip
    """One probe intent per user in ``tokens`` (user id -> bearer token), ``spacing_s`` apart."""
    out, lock = ProbeResult(), threading.Lock()
    threads = []

    def guarded(i: int, user: str, bearer: str) -> None:
        try:
            _one(url, sale_id, skus[i % len(skus)], user, bearer, out, lock, timeout)
        except Exception as exc:  # a probe that failed says so in the report
            with lock:
                out.failures.append(f"{user}: {type(exc).__name__}: {exc}")

    for i, (user, bearer) in enumerate(sorted(tokens.items())):
        t = threading.Thread(target=guarded, args=(i, user, bearer), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(spacing_s)
    deadline = time.monotonic() + timeout + 5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return out
