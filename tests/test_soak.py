"""The soak test's short CI version (issue 16): ~45 s of mixed tenants, hot swaps, cancels, 1 ms deadlines and a
bad request every second against the tiny model; zero unexpected statuses and flat resources. The 30-minute
run is `python -m bench.soak` (bench/RESULTS.md)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.timeout(400)]


def test_short_soak_is_flat_with_no_unexpected_status(tiny_llama_dir, tmp_path):
    from bench.soak import plot, run

    report = run(tiny_llama_dir, duration_s=45, swap_every_s=8, bad_every_s=1, sample_s=3, rss_slack_mb=64)
    plot(report, tmp_path / "soak.png")
    assert report.unexpected_count == 0, report.unexpected
    done = report.calls
    for action in ("generate OK", "stream OK", "cancel OK", "upload OK", "bad:no key UNAUTHENTICATED",
                   "bad:upload INVALID_ARGUMENT"):
        assert done.get(action, 0) > 0, (action, done)
    assert done.get("deadline DEADLINE_EXCEEDED", 0) > 0, done
    assert report.end == {"kv_blocks_used": 0, "staging_bytes": 0, "running": 0, "waiting": 0}, report.end
    assert report.flat, (report.drift, [(s.rss_mb, s.fds, s.threads) for s in report.samples])
    assert (tmp_path / "soak.png").stat().st_size > 0
