"""bench/prefix_cache.py: its smoke run through the runner (`python -m bench prefix`), and its llama.cpp peer
(bench/llama_peer.py) against a stand-in llama-server (tests/fake_llama_server.py): the prompts it sends are the
workload's, token for token, each turn the whole history with the answers it streamed back."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

from bench.llama_peer import LlamaServer, run_chats

FAKE = Path(__file__).with_name("fake_llama_server.py")


def _fake_binary(tmp_path: Path) -> Path:
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_the_peer_sends_each_conversation_its_history_and_reads_the_stream(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "prompts.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    server = LlamaServer(_fake_binary(tmp_path), tmp_path / "model.gguf", parallel=2, ctx_size=512, threads=1,
                         startup_s=30)
    try:
        assert "127.0.0.1" in server.cmd and "--cache-prompt" in server.cmd
        system, turns = [7] * 10, [[[1, 2], [3]], [[4], [5, 6]]]
        ttft, tps, cached_share = run_chats(server, system, turns, new_tokens=3)
    finally:
        server.close()
    assert server.proc.poll() is not None  # stopped
    prompts = sorted(json.loads(line) for line in log.read_text().splitlines())
    # conversation 0: system + [1, 2] -> answer 12, 13, 14 (len 12); then + answer + [3]
    assert [7] * 10 + [1, 2] in prompts and [7] * 10 + [1, 2, 12, 13, 14, 3] in prompts
    assert [7] * 10 + [4] in prompts and [7] * 10 + [4, 11, 12, 13, 5, 6] in prompts and len(prompts) == 4
    assert len(ttft) == 2 and all(len(t) == 2 and min(t) > 0 for t in ttft) and tps > 0
    # cached (the fake's longest common prefix with an earlier prompt), whatever the order: the later first turn
    # shares the system prompt (10), each second turn its own first prompt (12 and 11)
    assert abs(cached_share - 33 / sum(len(p) for p in prompts)) < 1e-9


def test_smoke_run_through_the_runner(capsys, monkeypatch) -> None:
    from bench.__main__ import SUITES
    from bench.__main__ import main as runner

    monkeypatch.delenv("SWITCHBOARD_LLAMA_SERVER", raising=False)
    assert SUITES["prefix"][0] == "bench.prefix_cache"
    assert runner(["prefix", "--smoke", "--adapters", "0"]) == 0
    out = capsys.readouterr().out
    assert "| base | 2 |" in out and "llama.cpp peer skipped" in out
