"""``agiasi studio``: the web workbench's server, started like any other command."""

from __future__ import annotations

import ipaddress
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from agiasi.errors import AgiasiError
from agiasi.options import option


@dataclass
class StudioConfig:
    """Every field is a flag of ``agiasi studio``."""

    host: str = option("127.0.0.1", "address to listen on (anything but loopback needs a token)")
    port: int = option(7860, "port to listen on", ge=1, le=65535)
    root: str = option(".", "the folder the studio reads and writes in (datasets, runs)")
    token: str | None = option(
        None, "the token a browser must present (default on a non-loopback host: a new one)"
    )
    open: bool = option(False, "open the page in the browser")

    def validate(self) -> None:
        from agiasi.options import check

        check(self)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def studio(cfg: StudioConfig, say=None) -> None:
    """Serve the studio until Ctrl-C; prints the URL (with the token when there is one)."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg.validate()
    try:
        import uvicorn

        from agiasi.studio.server import create_app
    except ImportError as e:
        raise AgiasiError(
            f"the studio needs its extra: pip install 'agiasi[studio]' ({e.name} is missing)"
        ) from None
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise AgiasiError(f"--root {cfg.root}: no such folder")
    loopback = is_loopback(cfg.host)
    token = cfg.token or (None if loopback else secrets.token_urlsafe(24))
    app = create_app(root, token=token, loopback_port=cfg.port if loopback else None)
    # A chat reply is written by a thread that holds the GIL between the model's small kernels;
    # Python hands it to the event loop (which sends the token) only every switch interval, 5 ms
    # by default: a delay each token had in the page and not in `agiasi chat` (bench/chat_ttft.py).
    sys.setswitchinterval(0.0005)
    shown_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{shown_host}:{cfg.port}/" + (f"?token={token}" if token else "")
    say(f"agiasi studio: {url} (root {root.resolve()}; Ctrl-C stops the server, not the runs)")
    if cfg.open:
        import webbrowser

        webbrowser.open(url)
    # an open event stream never ends by itself: shutdown closes it after a short grace
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)  # fmt: skip
