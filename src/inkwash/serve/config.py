"""The options of ``inkwash serve``."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from inkwash.errors import InkwashError
from inkwash.options import check_options, option
from inkwash.sampling.options import device_option, precision_option

LOOPBACK = "127.0.0.1"


@dataclass
class ServeOptions:
    checkpoint: str | None = option(
        None, "a run folder to serve (its newest checkpoint), or a diffusers / Stable Diffusion folder", metavar="RUN"
    )
    models: str | None = option(
        None,
        "offer every run folder and diffusers folder under this folder, each picked by its name (relative path)",
        metavar="DIR",
    )
    host: str = option(LOOPBACK, "address to bind; anything but loopback exposes the server to the network")
    port: int = option(7860, "port to listen on (0: any free port)", minimum=0, maximum=65535)
    listen: bool = option(False, "bind 0.0.0.0 (all interfaces), as the WebUI's --listen does")
    api_auth: str | None = option(
        None, "HTTP basic auth for the page and the API: user:pass[,user2:pass2]", metavar="USER:PASS"
    )
    queue_size: int = option(4, "requests that may wait behind the running one; more get a 429", minimum=1)
    max_steps: int = option(1000, "the most sampler steps a request may ask for", minimum=1)
    max_batch_size: int = option(16, "the largest batch_size a request may ask for", minimum=1)
    max_images: int = option(64, "the most images (batch_size x n_iter) one request may ask for", minimum=1)
    max_pixels: int = option(
        1024 * 1024,
        "the largest width x height a request may ask of a Stable Diffusion folder (other models make only their size)",
        minimum=64,
    )
    max_body_mb: float = option(4.0, "the largest request body, in MiB; larger ones get a 413", exclusive_minimum=0)
    save_dir: str | None = option(
        None, "write the PNGs of requests with save_images: true into this folder (otherwise it is ignored)"
    )
    threads: int | None = option(
        None,
        "torch CPU threads for the model (default: the cores less one, so that the server and a browser on the "
        "same machine keep a core)",
        minimum=1,
    )
    device: str = device_option()
    precision: str = precision_option()

    def validate(self) -> None:
        check_options(self)
        if self.checkpoint is None and self.models is None:
            raise InkwashError("give --checkpoint RUN, --models DIR or both")
        self.credentials()

    def cpu_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 2) - 1)

    @property
    def bind_host(self) -> str:
        return "0.0.0.0" if self.listen else self.host

    @property
    def exposed(self) -> bool:
        """Whether the bound address reaches beyond this machine."""
        host = self.bind_host
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True  # a host name: assume it resolves to a reachable address

    def credentials(self) -> dict[str, str]:
        """{user: password} from ``--api-auth``; empty when auth is off."""
        if not self.api_auth:
            return {}
        pairs = {}
        for item in self.api_auth.split(","):
            user, sep, password = item.strip().partition(":")
            if not sep or not user or not password:
                raise InkwashError(f"--api-auth expects user:pass[,user2:pass2], got {item.strip()!r}")
            pairs[user] = password
        return pairs
