"""The OpenAI-compatible HTTP API (Starlette on uvicorn), served beside gRPC over the same engine.

connections.py (header timeout, connection caps, keyless-last), errors.py (OpenAI error objects, exception ->
HTTP status table), schemas.py (request bodies -> engine requests, validation naming the field), bridge.py
(engine handles -> asyncio), responses.py (OpenAI response and chunk objects), routes.py (the endpoints),
openapi.py (the /openapi.json document), app.py (app + uvicorn in a thread). A call's life (slot, quota,
abort, billing) is server/lifecycle.py, shared with gRPC.
"""
