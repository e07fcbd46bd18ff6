"""The soak's sampling and growth report (no servers: this process's own /proc entries)."""

from __future__ import annotations

import os

import pytest

from flashsale.soak import growth, sample


def test_sample_reads_memory_and_files_of_live_pid_files_and_skips_dead_ones(tmp_path):
    (tmp_path / "me.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "gone.pid").write_text("999999999\n")
    (tmp_path / "sub" / "junk.pid").write_text("not a pid\n")
    got = sample([tmp_path])
    assert set(got) == {f"{tmp_path.name}/me"}
    rss_mb, files = got[f"{tmp_path.name}/me"]
    assert rss_mb > 1 and files >= 3  # stdin, stdout, stderr at least


def test_growth_compares_the_first_minute_after_warmup_with_the_last():
    samples = [
        {"t": t, "procs": {"app": (100.0 + t / 10, 20 + (t >= 540))}} for t in range(0, 601, 5)
    ]
    g = growth(samples)["app"]
    # First minute after the warm-up: t = 60..115 s, median t 87.5; last: 545..600, 572.5.
    assert g["rss_mb_first"] == pytest.approx(108.75, abs=0.06)
    assert g["rss_mb_last"] == pytest.approx(157.25, abs=0.06)
    assert g["rss_growth_mb"] == pytest.approx(48.5, abs=0.11)
    assert g["rss_growth_pct"] == pytest.approx(100 * 48.5 / 108.75, abs=0.1)
    assert (g["files_first"], g["files_last"]) == (20, 21)
