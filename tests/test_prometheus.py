"""A real Prometheus server scrapes our /metrics and answers PromQL about what the test sent.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it when missing). Without it
the test is skipped with the reason (shown in pytest's -ra summary and printed to stderr).
Checked: per-tenant prompt / generated token counters and the VTC service counters equal the sums of the
responses' usage, and `histogram_quantile` over our TTFT histogram equals the same quantile computed here
from the responses' TTFTs with Prometheus's interpolation rule (the same observations: the server reports
the TTFT it records in the response's timings).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from server.metrics import LATENCY_BUCKETS
from tests.server_utils import running_server, wait_until

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = Path(__file__).resolve().parents[1] / "bench" / "grafana" / "switchboard.json"


def dashboard_queries() -> list[str]:
    """The Grafana dashboard's PromQL, with its variables filled in as Grafana would."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "1m").replace("$tenant", ".*")
            for p in panels for t in p["targets"]]


def test_dashboard_names_only_metrics_we_export() -> None:
    import re

    from server.engine.engine import EngineStats
    from server.engine.fairness import TenantService
    from server.metrics import ServerMetrics

    m = ServerMetrics(lambda: EngineStats(1, 2, 3, 4, 5, 6, 7, 8, 9),
                      fairness=lambda: {"acme": TenantService(1.0, 2.0, 3, 4, 5)})
    m.observe_request("acme", "", "OK", prompt_tokens=3, completion_tokens=4, queue_s=0.1, ttft_s=0.2, total_s=0.3)
    m.observe_throttled("acme", "tokens_per_minute")
    exported = {s.name for family in m.registry.collect() for s in family.samples}
    used = {n for q in dashboard_queries() for n in re.findall(r"\bswitchboard_[a-z_]+", q)}
    assert used and used <= exported, f"the dashboard names metrics we do not export: {sorted(used - exported)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _by_tenant(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("tenant", ""): float(r["value"][1]) for r in result}


def prometheus_quantile(q: float, values: list[float], bounds=LATENCY_BUCKETS) -> float:
    """What PromQL's histogram_quantile returns for these observations in buckets with upper `bounds`."""
    uppers = [*bounds, float("inf")]
    cumulative = [sum(v <= b for v in values) for b in uppers]
    rank = q * cumulative[-1]
    i = next(i for i, c in enumerate(cumulative) if c >= rank)
    if uppers[i] == float("inf"):
        return uppers[i - 1]
    lower = uppers[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0
    return lower + (uppers[i] - lower) * (rank - below) / (cumulative[i] - below)


@pytest.fixture()
def prometheus(tmp_path: Path):
    if PROMETHEUS is None:
        reason = "the `prometheus` binary is not installed (apt-get install -y prometheus; .ci/run does it)"
        print(f"SKIPPING the real-Prometheus test: {reason}", file=sys.stderr)
        pytest.skip(reason)

    def start(metrics_port: int) -> str:
        port = _free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                       "  - job_name: switchboard\n    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{metrics_port}']\n")
        log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                return False

        wait_until(ready, timeout=60, interval=0.2, what="prometheus to be ready")
        return base

    procs: list = []
    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.timeout(300)
def test_prometheus_scrapes_token_counters_and_ttft_quantiles(tiny_llama_dir: Path, prometheus) -> None:
    plan = {"acme": [(8, 10)] * 6 + [(3, 2)] * 4, "bob": [(5, 4)] * 5}  # (prompt tokens, new tokens)
    with running_server(tiny_llama_dir, tenants=list(plan)) as srv:
        base = prometheus(int(srv.metrics_url.split(":")[-1].split("/")[0]))
        sent: dict[str, dict[str, float]] = {t: {"prompt": 0, "completion": 0} for t in plan}
        ttfts: dict[str, list[float]] = {t: [] for t in plan}
        for tenant, shapes in plan.items():
            with srv.client(tenant) as c:
                for i, (n_prompt, n_new) in enumerate(shapes):
                    r = c.generate(token_ids=[100 + i + k for k in range(n_prompt)], max_new_tokens=n_new,
                                   ignore_eos=True)
                    sent[tenant]["prompt"] += r.prompt_tokens
                    sent[tenant]["completion"] += r.completion_tokens
                    ttfts[tenant].append(r.ttft_ms / 1e3)
        want_prompt = {t: v["prompt"] for t, v in sent.items()}
        want_generated = {t: v["completion"] for t, v in sent.items()}

        def scraped() -> bool:
            got = _by_tenant(_query(base, "sum by (tenant) (switchboard_prompt_tokens_total)"))
            return got == want_prompt

        wait_until(scraped, timeout=30, interval=0.5, what=f"prometheus to report prompt tokens {want_prompt}")
        assert _by_tenant(_query(base, "sum by (tenant) (switchboard_generated_tokens_total)")) == want_generated
        cfg = srv.engine.config
        service = _by_tenant(_query(base, "switchboard_tenant_service_total"))
        assert service == {t: cfg.w_in * want_prompt[t] + cfg.w_out * want_generated[t] for t in plan}
        assert _by_tenant(_query(base, 'switchboard_requests_total{status="OK"}')) == {
            t: float(len(s)) for t, s in plan.items()}
        for tenant in plan:
            for q in (0.5, 0.99):
                result = _query(base, f"histogram_quantile({q}, sum by (le) "
                                      f"(switchboard_time_to_first_token_seconds_bucket{{tenant=\"{tenant}\"}}))")
                got = float(result[0]["value"][1])
                want = prometheus_quantile(q, ttfts[tenant])
                assert got == pytest.approx(want, rel=1e-6), f"{tenant} p{int(q * 100)}: {got} vs {want} {ttfts}"
        for promql in dashboard_queries():  # every dashboard panel's query is valid PromQL over our series
            _query(base, promql)
