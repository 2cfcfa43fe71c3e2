"""`personaedit serve`: an OpenAI-compatible server where each request picks its own edit.

The HTTP layer (`app.create_app`) needs the `serve` extra (FastAPI, uvicorn); the per-row edit mechanics
(`rowwise`), batched decoding (`decode`) and the continuous batcher (`batcher`) need only torch.
"""
