"""`hhh serve`: the aligned model behind an OpenAI-compatible API whose users' feedback lands in the preference
store (hhh.serve.api), over a continuous-batching engine (hhh.serve.engine).

>>> app, engine = build(ServeConfig(adapter=["runs/detox/run"]))   # doctest: +SKIP
"""

from __future__ import annotations

import sys
from pathlib import Path

from hhh.config import ServeConfig


def read_api_keys(path: str | Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with # are skipped. An empty file is an error (a server
    meant to be locked must not start open)."""
    keys = [line.strip() for line in Path(path).read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"api_key_file {path}: no keys in it")
    if any(len(k) < 8 or len(k) > 200 or not k.isprintable() or " " in k for k in keys):
        raise ValueError(f"api_key_file {path}: each key must be 8 to 200 printable characters without spaces")
    return frozenset(keys)


def adapter_paths(specs: list[str]) -> dict[str, Path]:
    """Request name -> adapter folder, from PATH (named 'aligned') or NAME=PATH; a run folder means its adapter."""
    from hhh.optimize.merge import find_source

    out: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else ("aligned", "", spec)
        found = find_source(path, model=None).adapter
        if found is None:
            raise ValueError(f"adapter {spec!r}: {path} holds no LoRA adapter (adapter_config.json)")
        out[name] = found
    return out


def build(config: ServeConfig, *, store=None):
    """Load the model and adapters, start the engine; returns (FastAPI app, engine)."""
    import torch

    from hhh.feedback.store import Store
    from hhh.models import load_adapter, load_causal_lm, load_tokenizer
    from hhh.serve.api import Settings, create_app
    from hhh.serve.engine import Engine

    keys = read_api_keys(config.api_key_file) if config.api_key_file else frozenset()
    adapters = adapter_paths(config.adapter)   # bad paths fail before the model loads
    store = store if store is not None else Store(config.db)
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    internal = {}
    for i, (name, path) in enumerate(adapters.items()):
        internal[name] = f"a{i}"  # PEFT names are module keys: no dots; the public name can be anything
        model = load_adapter(model, path, name=f"a{i}")
    model.eval()
    engine = Engine(model, tokenizer, max_batch=config.max_batch, batch_wait=config.batch_wait_ms / 1000,
                    adapters=internal).start()
    settings = Settings(base_name=config.served_name or config.model, adapters={n: str(p) for n, p in adapters.items()},
                        default_max_tokens=config.default_max_tokens, max_tokens=config.max_tokens,
                        max_body=config.max_body_kb * 1024, api_keys=keys, model_spec=config.model)
    return create_app(engine, settings, store=store), engine


def serve(config: ServeConfig) -> None:
    import uvicorn

    from hhh.feedback.app import is_loopback

    app, engine = build(config)
    names = ", ".join([app.state.settings.base_name, *app.state.settings.adapters])
    print(f"hhh serve: http://{config.host}:{config.port}/v1  models: {names}  (store: "
          f"{app.state.store.display_url})", flush=True)
    if not is_loopback(config.host):
        print(f"warning: serving plain HTTP on {config.host}, reachable from other machines"
              + ("" if config.api_key_file else " and without API keys (--api-key-file)")
              + ": put a TLS proxy in front or use --host 127.0.0.1.", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        engine.stop()
