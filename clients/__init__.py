"""Switchboard Python client: sync (`SwitchboardClient`) and asyncio (`AsyncSwitchboardClient`).

    from clients import SwitchboardClient
    with SwitchboardClient("127.0.0.1:50051", api_key="sb-...") as client:
        print(client.generate("Name three colors.", max_new_tokens=32).text)

CLI: `python -m clients --help`.
"""

from clients.aio import AsyncSwitchboardClient
from clients.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SwitchboardError,
    Unauthenticated,
    Unavailable,
)
from clients.results import AdapterInfo, GenerateResult, StreamChunk, UsageReport, UsageRow
from clients.sync import SwitchboardClient

__all__ = [
    "AdapterInfo", "AsyncSwitchboardClient", "Cancelled", "DeadlineExceeded", "FailedPrecondition",
    "GenerateResult", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "StreamChunk",
    "SwitchboardClient", "SwitchboardError", "Unauthenticated", "Unavailable", "UsageReport", "UsageRow",
]
