"""The generated gRPC stubs (switchboard.v1); generated from proto/ first if this checkout has none yet."""

from __future__ import annotations

try:
    from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
except ImportError:  # a fresh checkout without `make proto`
    from server.protogen import ensure_stubs

    ensure_stubs()
    from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["admin_pb2", "admin_pb2_grpc", "health_pb2", "health_pb2_grpc", "inference_pb2", "inference_pb2_grpc"]
