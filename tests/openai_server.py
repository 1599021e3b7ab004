"""hhh serve's API over a (tiny) model in this process, on a local port: for the tests of the server itself and of
hhh's endpoint clients (Constitutional AI's `openai:MODEL@URL` critic)."""

import threading
import time

import uvicorn

from tests.feedback_server import free_port


class Endpoint:
    """`with Endpoint(model, tokenizer, key) as url:` serves the model at url (".../v1") for the block, under the
    name `name`; `adapters` {request name: PEFT adapter name on the model}; `store` keeps answers and feedback."""

    def __init__(self, model, tokenizer, key: str | None = None, *, name: str = "tiny", store=None,
                 adapters: dict[str, str] | None = None, max_batch: int = 16, **settings) -> None:
        from hhh.models.load import prepare_tokenizer
        from hhh.serve.api import Settings, create_app
        from hhh.serve.engine import Engine

        self.engine = Engine(model, prepare_tokenizer(tokenizer), max_batch=max_batch, batch_wait=0,
                             adapters=adapters)
        self.settings = Settings(base_name=name, adapters={a: f"adapters/{a}" for a in adapters or {}},
                                 api_keys=frozenset([key] if key else []), **settings)
        self.app = create_app(self.engine, self.settings, store=store)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    last: "Endpoint | None" = None  # the endpoint most recently entered (tests reach its engine's counters)

    def __enter__(self) -> str:
        Endpoint.last = self
        self.engine.start()
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("endpoint did not start in 30 s")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def stacks(self) -> str:
        """Where this endpoint's server (event loop) and engine threads are now: for a failing test's message."""
        import sys
        import traceback

        frames = sys._current_frames()
        parts = []
        for name, thread in (("server", self.thread), ("engine", self.engine._thread)):
            frame = frames.get(thread.ident) if thread is not None and thread.ident is not None else None
            parts.append(f"--- {name} thread ---\n" + ("".join(traceback.format_stack(frame)) if frame else "gone\n"))
        return "".join(parts)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()
