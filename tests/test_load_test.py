"""The load-test driver: timing of streamed chunks, open/closed loop, errors by status, the CLI, a live run."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import grpc
import pytest

from bench import load_test
from bench.load_run import Workload, make_plan, run_load


@dataclass
class Chunk:
    token_ids: list[int]
    text: str = ""
    finished: bool = False


class StatusError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeClient:
    """Streams `n` tokens: the first after `ttft` s, the rest `itl` s apart; adapter "bad" fails; records calls."""

    def __init__(self, ttft: float = 0.03, itl: float = 0.01, max_in_flight: int | None = None) -> None:
        self.ttft, self.itl = ttft, itl
        self.calls: list[dict] = []
        self.in_flight = self.peak = 0
        self.max_in_flight = max_in_flight
        self.sent_at: list[float] = []

    async def stream(self, **kw):
        self.calls.append(kw)
        self.sent_at.append(time.perf_counter())
        if kw["adapter"] == "bad":
            raise StatusError(grpc.StatusCode.NOT_FOUND, "no such adapter")
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.ttft)
            for i in range(kw["max_new_tokens"]):
                if i:
                    await asyncio.sleep(self.itl)
                yield Chunk([kw["token_ids"][0] + i], finished=i == kw["max_new_tokens"] - 1)
        finally:
            self.in_flight -= 1

    async def close(self):
        pass


def test_plan_is_deterministic_and_follows_the_workload():
    w = Workload(num_requests=40, adapters=("a", "b", "c"), popularity="distinct", prompt_len="uniform:3-9",
                 output_len="fixed:5", seed=3)
    plan = make_plan(w, rate=10.0, arrival="gamma:2")
    assert plan == make_plan(w, rate=10.0, arrival="gamma:2")
    assert [r.adapter for r in plan[:4]] == ["a", "b", "c", "a"]
    assert all(3 <= len(r.token_ids) <= 9 and r.max_new_tokens == 5 for r in plan)
    assert all(1000 <= t < 20000 for r in plan for t in r.token_ids)
    assert plan[0].send_at_s == 0 and all(b.send_at_s >= a.send_at_s for a, b in zip(plan, plan[1:], strict=False))
    closed = make_plan(w)  # the same prompts, no send times
    assert [r.token_ids for r in closed] == [r.token_ids for r in plan] and closed[0].send_at_s is None
    assert make_plan(Workload(num_requests=3))[0].adapter == ""  # no adapters: the base model


@pytest.mark.parametrize("bad", [dict(num_requests=0), dict(prompt_len="fixed:0"), dict(output_len="zipf"),
                                 dict(adapters=("a",), popularity="pareto"), dict(token_id_range=(5, 5))])
def test_bad_workloads_are_refused(bad):
    with pytest.raises(ValueError):
        Workload(**bad)


def test_streamed_timings_are_measured_per_chunk():
    client = FakeClient(ttft=0.05, itl=0.02)
    w = Workload(num_requests=4, output_len="fixed:4", prompt_len="fixed:3")
    summary, records = asyncio.run(run_load(client, w, concurrency=4, show_progress=False))
    assert summary["completed"] == 4 and summary["errors"] == {} and summary["output_tokens"] == 16
    slack = 0.25  # sleep() only ever oversleeps; allow scheduling delays on a busy shared machine
    for r in records:
        assert 0.05 <= r.ttft_s < 0.05 + slack
        assert all(0.02 <= g < 0.02 + slack for g in r.itls_s) and len(r.itls_s) == 3
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 3)
    assert 50 <= summary["ttft_ms"]["p50"] < 50 + slack * 1e3 and 20 <= summary["itl_ms"]["p50"] < 20 + slack * 1e3
    call = client.calls[0]
    assert call["ignore_eos"] is True and call["temperature"] == 0.0 and len(call["token_ids"]) == 3
    assert len({c["request_id"] for c in client.calls}) == 4


def test_closed_loop_keeps_exactly_the_concurrency():
    client = FakeClient(ttft=0.01, itl=0.002)
    w = Workload(num_requests=24, output_len="fixed:3")
    summary, records = asyncio.run(run_load(client, w, concurrency=3, show_progress=False))
    assert client.peak == 3 and summary["completed"] == 24 and len(records) == 24


def test_open_loop_sends_on_schedule_whatever_the_latency():
    client = FakeClient(ttft=0.6, itl=0.01)  # slow server: an open loop must not wait for it
    w = Workload(num_requests=12, output_len="fixed:2", seed=1)
    plan = make_plan(w, rate=40.0)
    summary, _ = asyncio.run(run_load(client, w, rate=40.0, show_progress=False))
    offsets = [t - client.sent_at[0] for t in client.sent_at]
    for planned, actual in zip([r.send_at_s for r in plan], offsets, strict=True):
        assert planned - 0.005 <= actual < planned + 0.25  # late only by scheduling delays, never early
    assert client.peak > 3  # requests overlapped
    assert summary["mode"] == {"rate": 40.0, "arrival": "poisson", "concurrency": None}


def test_errors_are_counted_by_grpc_status():
    client = FakeClient(ttft=0.05, itl=0.01, max_in_flight=2)
    w = Workload(num_requests=9, adapters=("ok", "bad", "ok"), popularity="distinct", output_len="fixed:2")
    summary, records = asyncio.run(run_load(client, w, concurrency=3, show_progress=False))
    assert summary["errors"]["NOT_FOUND"] == 3
    assert summary["errors"].get("RESOURCE_EXHAUSTED", 0) + summary["completed"] == 6
    assert {r.error_message for r in records if r.error == "NOT_FOUND"} == {"no such adapter"}


def test_cli_sweep_writes_json_and_plot(tmp_path):
    args = load_test.build_parser().parse_args([
        "--rates", "20,40", "--num-requests", "6", "--adapters", "4", "--popularity", "zipf:1.5",
        "--output-len", "fixed:3", "--slo-ttft-ms", "1000", "--json", str(tmp_path / "r.json"),
        "--plot", str(tmp_path / "r.png"), "--no-progress", "--warmup", "1", "--save-requests"])
    report = asyncio.run(load_test.run_from_args(args, client=FakeClient(ttft=0.01, itl=0.005)))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["sweep"] == "rate" and [r["mode"]["rate"] for r in saved["runs"]] == [20.0, 40.0]
    assert all(r["completed"] == 6 and r["goodput_rps"] > 0 for r in report["runs"])
    assert len(saved["runs"][0]["requests_detail"]) == 6
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        load_test.build_parser().parse_args(["--rates", "1,-2"])
    with pytest.raises(SystemExit):
        load_test.build_parser().parse_args(["--rate", "1", "--concurrency", "2"])
    assert load_test.main(["--num-requests", "0", "--no-progress"]) == 2
    assert "num_requests" in capsys.readouterr().err
    from clients.__main__ import main as clients_main  # also reachable as `python -m clients load-test`

    assert clients_main(["load-test", "--popularity", "pareto", "--adapters", "2", "--no-progress"]) == 2
    assert "unknown popularity" in capsys.readouterr().err


def test_gpu_benchmark_harness_runs_on_a_tiny_shape(tmp_path):
    """bench.gpu_llama7b's random-weight model, adapters and decode timing, on a tiny Llama shape (CPU here)."""
    from bench import gpu_llama7b

    out = tmp_path / "g.json"
    assert gpu_llama7b.main(["--smoke", "--batch", "3", "--adapters", "3", "--prompt-len", "5", "--new-tokens", "3",
                             "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["popularity"] for r in report["decode"]] == ["no adapter", "distinct", "uniform", "zipf:1.5",
                                                           "identical"]
    assert all(r["decode_tokens_per_s"] > 0 for r in report["decode"])
    assert report["decode"][1]["distinct_adapters"] == 3 and report["decode"][4]["distinct_adapters"] == 1


def test_live_run_against_a_test_server_completes_with_zero_errors(tiny_llama_dir, tmp_path):
    """The real path: gRPC streams to a running server (tiny random model), adapters by popularity, both loops."""
    from server.config import AdapterPoolConfig
    from tests.adapter_files import peft_adapter
    from tests.server_utils import running_server

    with running_server(tiny_llama_dir, pool_cfg=AdapterPoolConfig(device_slots=2, max_lora_rank=8)) as s:
        with s.client(None) as admin:  # one adapter through the Admin API, the others straight into the registry
            admin.upload_adapter(peft_adapter(tiny_llama_dir, seed=0), "lt-0")
        for i in (1, 2):
            s.registry.create("local", f"lt-{i}", peft_adapter(tiny_llama_dir, seed=i))
        common = ["--target", s.target, "--num-requests", "24", "--adapters", "3", "--adapter-prefix", "lt-",
                  "--prompt-len", "uniform:4-12", "--output-len", "fixed:6", "--no-progress"]
        rc_open = load_test.main([*common, "--rates", "40,80", "--popularity", "zipf:1.5", "--arrival", "gamma:2",
                                  "--slo-ttft-ms", "60000", "--json", str(tmp_path / "open.json"),
                                  "--plot", str(tmp_path / "open.png"), "--save-requests"])
        rc_closed = load_test.main([*common, "--concurrency", "8", "--popularity", "distinct",
                                    "--json", str(tmp_path / "closed.json"), "--save-requests"])
        assert s.engine.pool.stats().loads >= 3  # adapters really were used (3 adapters, 2 device slots)
    for name in ("open", "closed"):
        for run in json.loads((tmp_path / f"{name}.json").read_text())["runs"]:
            failed = [(r["error"], r["error_message"]) for r in run.get("requests_detail", []) if r["error"]]
            assert run["errors"] == {}, failed
            assert run["completed"] == 24 and run["output_tokens"] == 24 * 6
            assert run["goodput_rps"] > 0 and run["ttft_ms"]["p99"] >= run["ttft_ms"]["p50"] > 0
            assert run["itl_ms"]["p50"] > 0
    assert rc_open == rc_closed == 0
    assert (tmp_path / "open.png").stat().st_size > 1000


def test_compare_peers_runs_every_peer_on_the_same_requests(tiny_llama_dir, tmp_path):
    """The peer comparison end to end on the tiny model: every PEFT row produces exactly our greedy tokens."""
    from bench import compare_peers

    out = tmp_path / "peers.json"
    assert compare_peers.main(["--model", str(tiny_llama_dir), "--no-server", "--engine-inprocess", "--adapters", "3",
                               "--rank", "4", "--requests", "6", "--prompt-len", "5", "--new-tokens", "4",
                               "--concurrency", "4", "--single-requests", "2", "--merge-adapters", "2",
                               "--repeats", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]

    def row(prefix: str) -> dict:
        (match,) = [r for r in results if r["name"].startswith(prefix)]
        return match

    assert row("switchboard Engine in-process (no gRPC)")["tokens"] == 6 * 4
    assert all(len(r["runs_s"]) == 2 and "repeats differ" not in r["note"] for r in results)  # medians of 2 runs
    assert row("switchboard Engine in-process, 4 callers, NO adapters")["tokens"] == 6 * 4
    assert row("PEFT, one request")["agreement"].startswith("2/2 identical")
    assert row("PEFT mixed-adapter batches of 4")["agreement"].startswith("6/6 identical")
    assert row("merge per adapter")["agreement"].startswith("4/4 identical")  # 2 adapters x 2 requests
    assert len(results) == 6 and all(r["tokens_per_s"] > 0 for r in results)
