"""A real OpenAI-compatible chat server for the endpoint tests (FastAPI under uvicorn, on a free localhost port):
it answers from a table of known questions, reports usage, counts every request, and injects failures on demand
(a status code, or a delay longer than the client's timeout) so retries, timeouts and the cache are tested over HTTP
with the official openai SDK as the client, no mocked transport."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class FakeEndpoint:
    def __init__(self, answers: dict[str, str] | None = None, models=("hosted-mini",), key: str | None = None):
        self.answers = answers or {}
        self.models = list(models)
        self.key = key
        self.requests = 0  # chat completion requests received
        self.failures: list = []  # consumed one per request: an int status, or ("sleep", seconds)
        self.seen: list[dict] = []
        self.app = self._app()
        self._server = None

    def _app(self) -> FastAPI:
        app = FastAPI()

        def auth(request: Request):
            if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, status_code=401)
            return None

        @app.get("/v1/models")
        async def models(request: Request):
            return auth(request) or {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"} for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests += 1
            refused = auth(request)
            if refused:
                return refused
            if self.failures:
                f = self.failures.pop(0)
                if isinstance(f, tuple):
                    await asyncio.sleep(f[1])  # past the client's timeout
                else:
                    return JSONResponse({"error": {"message": f"injected {f}", "type": "server_error"}}, status_code=f,
                                        headers={"retry-after": "0"} if f == 429 else None)
            if body["model"] not in self.models:
                return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist", "code": "model_not_found"}}, status_code=404)
            self.seen.append(body)
            user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            text = self.answers.get(user, "I am not sure.")
            prompt_tokens = sum(len(str(m["content"]).split()) + 4 for m in body["messages"])
            return {"id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                              "total_tokens": prompt_tokens + len(text.split())}}

        return app

    def __enter__(self) -> "FakeEndpoint":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
