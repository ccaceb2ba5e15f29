"""``inkwash serve``: the web page and the WebUI-compatible API on uvicorn."""

from __future__ import annotations

import sys

from inkwash.errors import InkwashError
from inkwash.serve.config import ServeOptions


def run_server(options: ServeOptions) -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless ``--listen`` or another ``--host`` says otherwise."""
    options.validate()
    try:
        import uvicorn

        from inkwash.serve.app import bind, create_app
    except ImportError as exc:
        raise InkwashError(
            f"inkwash serve needs the serve extra ({exc.name} is missing): pip install 'inkwash[serve]'"
        ) from None
    import torch

    # On a small machine, torch's spin-waiting threads on every core starve the event loop and a browser
    # beside it (300 DDPM steps took 46-50 s instead of 3 s on 2 cores with chromium drawing the page).
    torch.set_num_threads(options.cpu_threads())
    app = create_app(options)
    host = options.bind_host
    sock = bind(host, options.port)
    port = sock.getsockname()[1]
    if options.exposed:
        print(
            f"warning: listening on {host}:{port}, reachable from other machines"
            + ("" if options.api_auth else "; anyone who can reach it can use it (see --api-auth)"),
            file=sys.stderr,
        )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    models = ", ".join(app.state.store.names)
    print(f"inkwash serve: http://{shown}:{port}/ (API docs: /docs; models: {models}); Ctrl+C stops", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
