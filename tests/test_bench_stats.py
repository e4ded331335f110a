"""Load-test maths: arrival processes, length distributions, popularity, percentiles, goodput, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.arrivals import LengthDist, arrival_times, interarrival_gaps
from bench.stats import SLO, RequestRecord, format_summary, percentiles, summarize
from bench.workloads import sample_adapter_ids


@pytest.mark.parametrize("kind", ["poisson", "gamma:0.5", "gamma:1", "gamma:3", "constant"])
@pytest.mark.parametrize("rate", [0.5, 4.0, 37.0])
def test_mean_arrival_rate_within_tolerance(kind, rate):
    rng = np.random.default_rng(int(rate * 100) + len(kind))
    rates = [len(g) / g.sum() for g in (interarrival_gaps(kind, rate, 2000, rng) for _ in range(20))]
    # gamma(cv=3) gaps have std 3/rate: the mean of 2000 has relative std 3/sqrt(2000) = 6.7%; 20 runs -> 1.5%
    assert np.mean(rates) == pytest.approx(rate, rel=0.05)


@pytest.mark.parametrize("cv", [0.25, 1.0, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_cv(cv):
    gaps = interarrival_gaps(f"gamma:{cv}", 3.0, 200_000, np.random.default_rng(7))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert gaps.min() >= 0


def test_poisson_counts_per_window_are_poisson():
    """Arrivals in unit windows of a rate-5 Poisson process: mean 5 and variance 5 (index of dispersion 1)."""
    times = arrival_times("poisson", 5.0, 50_000, np.random.default_rng(3))
    counts = np.bincount(times.astype(int))[:-1]  # drop the last, partial window
    assert counts.mean() == pytest.approx(5.0, rel=0.03)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.06)
    bursty = np.bincount(arrival_times("gamma:3", 5.0, 50_000, np.random.default_rng(3)).astype(int))[:-1]
    assert bursty.var() / bursty.mean() > 3  # gamma cv 3 is much burstier per window


def test_arrival_times_start_at_zero_and_increase():
    t = arrival_times("poisson", 2.0, 100, np.random.default_rng(0))
    assert t[0] == 0 and len(t) == 100 and np.all(np.diff(t) >= 0)
    assert arrival_times("constant", 4.0, 5, np.random.default_rng(0)).tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert arrival_times("poisson", 1.0, 0, np.random.default_rng(0)).size == 0


def test_arrivals_are_reproducible_from_the_seed():
    a = arrival_times("gamma:2", 3.0, 50, np.random.default_rng(11))
    b = arrival_times("gamma:2", 3.0, 50, np.random.default_rng(11))
    c = arrival_times("gamma:2", 3.0, 50, np.random.default_rng(12))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("kind,rate", [("weibull", 1.0), ("poisson", 0.0), ("poisson", -1.0),
                                       ("gamma:0", 1.0), ("gamma:x", 1.0), ("poisson", math.inf)])
def test_bad_arrival_specs_are_refused(kind, rate):
    with pytest.raises(ValueError):
        interarrival_gaps(kind, rate, 10, np.random.default_rng(0))


def test_length_distributions():
    rng = np.random.default_rng(5)
    assert LengthDist("fixed:32").sample(4, rng).tolist() == [32] * 4
    u = LengthDist("uniform:10-20").sample(20_000, rng)
    assert u.min() == 10 and u.max() == 20 and u.mean() == pytest.approx(15, rel=0.02)
    n = LengthDist("normal:100,10").sample(20_000, rng)
    assert n.mean() == pytest.approx(100, rel=0.01) and n.std() == pytest.approx(10, rel=0.05)
    ln = LengthDist("lognormal:64,0.5").sample(20_000, rng)
    assert np.median(ln) == pytest.approx(64, rel=0.03) and ln.min() >= 1
    e = LengthDist("exp:50").sample(20_000, rng)
    assert e.mean() == pytest.approx(50, rel=0.05) and e.min() >= 1
    assert LengthDist("normal:1,50").sample(1000, rng).min() >= 1  # clipped, never 0 or negative


@pytest.mark.parametrize("spec", ["fixed:0", "fixed", "uniform:5-2", "uniform:0-3", "normal:3", "lognormal:-1,1",
                                  "exp:0.5", "poisson:3", ""])
def test_bad_length_specs_are_refused(spec):
    with pytest.raises(ValueError, match="length"):
        LengthDist(spec)


def test_popularity_frequencies():
    rng = np.random.default_rng(9)
    n, k = 200_000, 8
    assert sample_adapter_ids("distinct", 10, 4, rng).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert set(sample_adapter_ids("identical", 100, k, rng).tolist()) == {0}
    uniform = np.bincount(sample_adapter_ids("uniform", n, k, rng), minlength=k) / n
    assert np.allclose(uniform, 1 / k, atol=0.005)
    for kind, exponent in (("zipf:1.5", 1.5), ("powerlaw:0.8", 0.8), ("zipf", 1.5), ("powerlaw", 1.0)):
        freq = np.bincount(sample_adapter_ids(kind, n, k, rng), minlength=k) / n
        expected = 1 / np.arange(1, k + 1) ** exponent
        assert np.allclose(freq, expected / expected.sum(), atol=0.005), kind


def test_percentiles_on_known_inputs():
    p = percentiles(list(range(1, 101)))  # 1..100, numpy linear interpolation
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert p["mean"] == pytest.approx(50.5)
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "mean": 7.0}
    assert percentiles([0, 10])["p90"] == pytest.approx(9.0)
    assert all(math.isnan(v) for v in percentiles([]).values())


def record(ttft, token_gaps, adapter="a", prompt=4, error=None):
    """A request whose first token came at `ttft` s and the next ones after `token_gaps`."""
    times = list(np.cumsum([ttft, *token_gaps])) if ttft is not None else []
    return RequestRecord(adapter=adapter, prompt_tokens=prompt, max_new_tokens=len(times), ttft_s=ttft,
                         e2e_s=times[-1] if times else None, token_times_s=times, output_tokens=len(times),
                         error=error)


def test_summary_metrics_on_known_records():
    recs = [
        record(0.1, [0.02, 0.02, 0.02]),  # 4 tokens, TPOT 20 ms, e2e 160 ms
        record(0.3, [0.05]),  # 2 tokens, TPOT 50 ms, e2e 350 ms
        record(0.2, []),  # 1 token: no TPOT, no ITL
        record(None, [], error="RESOURCE_EXHAUSTED"),
        record(None, [], error="RESOURCE_EXHAUSTED"),
        record(None, [], error="UNAVAILABLE"),
    ]
    s = summarize(recs, duration_s=2.0)
    assert s["requests"] == 6 and s["completed"] == 3
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}
    assert s["output_tokens"] == 7 and s["output_token_throughput"] == pytest.approx(3.5)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["total_token_throughput"] == pytest.approx((7 + 12) / 2)
    assert s["ttft_ms"]["p50"] == pytest.approx(200) and s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx(35) and s["tpot_ms"]["p50"] == pytest.approx(35)
    assert sorted(np.round([g for r in recs for g in r.itls_s], 6)) == [0.02, 0.02, 0.02, 0.05]
    assert s["itl_ms"]["p50"] == pytest.approx(20) and s["itl_ms"]["p99"] == pytest.approx(49.1)
    assert s["e2e_ms"]["p50"] == pytest.approx(200) and s["e2e_ms"]["p99"] == pytest.approx(347.0)
    assert s["goodput_rps"] == pytest.approx(1.5)  # no SLO: every completed request counts
    text = format_summary(s)
    assert "RESOURCE_EXHAUSTED" in text and "TTFT" in text


def test_goodput_under_an_slo():
    recs = [record(0.1, [0.02, 0.02]), record(0.6, [0.02]), record(0.1, [0.2, 0.2]), record(None, [], error="X")]
    by_ttft = summarize(recs, 4.0, SLO(ttft_ms=500))
    assert by_ttft["goodput_rps"] == pytest.approx(2 / 4) and by_ttft["slo_attainment"] == pytest.approx(2 / 4)
    both = summarize(recs, 4.0, SLO(ttft_ms=500, tpot_ms=100))
    assert both["goodput_rps"] == pytest.approx(1 / 4)
    e2e = summarize(recs, 4.0, SLO(e2e_ms=510))  # e2e: 140 ms, 620 ms, 500 ms
    assert e2e["goodput_rps"] == pytest.approx(2 / 4)
    assert both["slo"] == {"ttft_ms": 500, "tpot_ms": 100, "e2e_ms": None}


def test_summary_refuses_a_zero_duration():
    with pytest.raises(ValueError):
        summarize([], 0.0)


def test_plots_write_pngs(tmp_path):
    from bench.plots import plot_bars, plot_rate_sweep, plot_scaling

    summaries = [summarize([record(0.1 * r, [0.02] * 3) for _ in range(4)], 2.0, SLO(ttft_ms=250))
                 for r in (1, 2, 4)]
    for path in (plot_rate_sweep([1, 2, 4], summaries, tmp_path / "sweep.png", title="t"),
                 plot_bars(["a", "b"], [3.0, 5.0], tmp_path / "bars.png", "tokens/s"),
                 plot_scaling([1, 10, 100], [50.0, 48.0, 40.0], [100.0, 120.0, 300.0], tmp_path / "scale.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_rate_sweep([1, 2], summaries, tmp_path / "bad.png")
