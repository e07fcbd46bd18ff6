"""`flashsale trace`: every line of the namespace's service logs that names the intent."""

from __future__ import annotations

from pathlib import Path

from flashsale.trace import log_lines


def test_lines_naming_the_intent_are_found_in_every_service_log(tmp_path: Path):
    (tmp_path / "http").mkdir()
    (tmp_path / "payments.log").write_text(
        '{"event": "payments.recorded", "intent_id": "abc123", "order_id": "ord-abc123"}\n'
        '{"event": "payments.recorded", "intent_id": "other"}\n'
    )
    (tmp_path / "http" / "app-18081.log").write_text(
        '{"event": "intent.not_acknowledged", "intent_id": "abc123", "left_out": 0}\n'
    )
    (tmp_path / "processor.log").write_text('{"event": "processor.progress", "records": 10}\n')
    found = list(log_lines(tmp_path, "abc123"))
    assert [where for where, _ in found] == ["http/app-18081.log", "payments.log"]
    assert all("abc123" in line for _, line in found)
    assert list(log_lines(tmp_path, "nothing-like-it")) == []
