"""The client CLI against a real server, the upload payload, and `python -m server serve` as a process
(prints how to call it; SIGTERM drains in-flight requests, then exits 0)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from clients import SwitchboardClient, Unavailable
from clients.__main__ import main as cli
from clients.messages import adapter_payload, upload_chunks
from tests.server_utils import running_server

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(tiny_llama_dir, tenants=["acme"]) as s:
        yield s


def test_cli_generate_stream_health(server, capsys):
    base = ["--target", server.target, "--api-key", server.keys["acme"]]
    assert cli([*base, "generate", "Name three colors.", "--max-new-tokens", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with server.client("acme") as c:
        want = c.generate(messages=[{"role": "user", "content": "Name three colors."}], max_new_tokens=5)
    assert result["token_ids"] == want.token_ids and result["text"] == want.text
    assert cli([*base, "stream", "hello", "--raw", "--max-new-tokens", "4", "--ignore-eos"]) == 0
    out = capsys.readouterr()
    with server.client("acme") as c:
        assert out.out == c.generate(prompt="hello", max_new_tokens=4, ignore_eos=True).text + "\n"
    assert "length; 4 tokens" in out.err
    assert cli(["--target", server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_cli_reports_server_errors(server, capsys):
    assert cli(["--target", server.target, "--api-key", "wrong", "generate", "hi"]) == 1
    assert "UNAUTHENTICATED: invalid API key" in capsys.readouterr().err
    code = cli(["--target", server.target, "--api-key", server.keys["acme"], "generate", "hi", "--adapter", "nope"])
    assert code == 1 and "NOT_FOUND: adapter 'nope' not found" in capsys.readouterr().err
    assert cli(["--target", "127.0.0.1:1", "--timeout", "2", "health"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_upload_payload_is_a_tar_of_the_two_peft_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(os.urandom(3000))
    (tmp_path / "README.md").write_text("not uploaded")
    payload = adapter_payload(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        weights = tar.extractfile("adapter_model.safetensors").read()
    assert weights == (tmp_path / "adapter_model.safetensors").read_bytes()
    chunks = list(upload_chunks(payload, "style", "", True, chunk_bytes=1000))
    assert chunks[0].metadata.sha256 == hashlib.sha256(payload).hexdigest()
    assert chunks[0].metadata.total_bytes == len(payload) and chunks[0].metadata.shared
    assert b"".join(c.data for c in chunks[1:]) == payload and all(len(c.data) <= 1000 for c in chunks[1:])
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_config.json"):
        adapter_payload(tmp_path)


def test_serve_process_prints_how_to_call_and_drains_on_sigterm(tiny_llama_dir, tmp_path):
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(tiny_llama_dir), "--no-quantize", "--port", "0",
           "--metrics-port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "data"), "--grace-period", "20"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Stop with"):
                break
        text = "".join(banner)
        assert "Switchboard is serving on 127.0.0.1:" in text, text
        assert "python -m clients --target 127.0.0.1:" in text
        target = text.split("serving on ")[1].split(";")[0].strip()
        with SwitchboardClient(target, timeout=60) as client:  # loopback without a tenants file: no key
            assert client.health() == "SERVING"
            chunks, started = [], threading.Event()

            def consume():
                for chunk in client.stream(token_ids=[5, 6, 7], max_new_tokens=300, ignore_eos=True):
                    chunks.append(chunk)
                    started.set()

            reader = threading.Thread(target=consume)
            reader.start()
            assert started.wait(60)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            reader.join(60)
            assert chunks[-1].finished and chunks[-1].finish_reason == "length"  # drained, not cut off
            assert chunks[-1].completion_tokens == 300
            with pytest.raises(Unavailable):  # new calls are refused once draining started
                client.generate(token_ids=[5], max_new_tokens=1, timeout=5)
        assert proc.wait(30) == 0
        rest = proc.stdout.read()
        assert "draining in-flight requests" in rest and "stopped" in rest
        print(f"SIGTERM -> exit 0 in {time.monotonic() - t0:.2f} s with one 300-token stream in flight")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
