"""The soak's hostile tenant: every `--bad-every-s` a bad request from a fixed table, and every third time a keyless
call and an upload whose bytes do not match its sha256; each must get its own status."""

from __future__ import annotations

import hashlib
import os
import threading

import grpc

from bench.soak import call_status

BAD_REQUESTS = [  # (what, generate kwargs, the status it must get)
    ("NaN temperature", {"token_ids": [5, 6], "temperature": float("nan")}, "INVALID_ARGUMENT"),
    ("unknown adapter", {"token_ids": [5, 6], "adapter": "nope" * 50}, "NOT_FOUND"),
    ("huge max_new_tokens", {"token_ids": [5, 6], "max_new_tokens": 10**9}, "INVALID_ARGUMENT"),
    ("too many messages", {"messages": [{"role": "user", "content": ""}] * 3000}, "INVALID_ARGUMENT"),
    ("token beyond vocab", {"token_ids": [5, 10**8]}, "INVALID_ARGUMENT"),
]


def bad_sender(srv, tenant: str, every_s: float, tally, stop: threading.Event) -> None:
    from switchboard.v1 import admin_pb2, admin_pb2_grpc

    k = 0
    with srv.client(tenant, timeout=60) as c, srv.client(None, timeout=10) as anonymous, \
            grpc.insecure_channel(srv.target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        while not stop.wait(every_s):
            k += 1
            what, kwargs, want = BAD_REQUESTS[k % len(BAD_REQUESTS)]
            status, msg = call_status(lambda kw=kwargs: c.generate(**kw))  # noqa: B023
            tally.record(f"bad:{what}", status, {want}, msg)
            if k % 3 == 0:  # a keyless call, and an upload whose bytes do not match its sha256
                status, msg = call_status(lambda: anonymous.list_adapters())
                tally.record("bad:no key", status, {"UNAUTHENTICATED"}, msg)
                data = os.urandom(4096)
                meta = admin_pb2.UploadMetadata(name="junk", sha256=hashlib.sha256(b"x").hexdigest())
                chunks = [admin_pb2.UploadChunk(metadata=meta), admin_pb2.UploadChunk(data=data)]
                status, msg = call_status(lambda ch=chunks: stub.UploadAdapter(  # noqa: B023
                    iter(ch), metadata=(("authorization", f"Bearer {srv.keys[tenant]}"),), timeout=30))
                tally.record("bad:upload", status, {"INVALID_ARGUMENT"}, msg)
