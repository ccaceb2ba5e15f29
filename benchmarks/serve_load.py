"""Load on ``inkwash serve``: latency, status codes and memory under concurrent good and bad requests.

Starts ``inkwash serve`` in a subprocess on a free port (``--checkpoint RUN``, or else a tiny random
class-conditional 1x16x16 model written to a temporary folder), waits until ``GET /sdapi/v1/samplers``
answers, then sends ``--requests`` requests (default 300) at ``--concurrency`` (default 16) with
httpx. A ``--malformed-fraction`` of them (default a fifth) are bad in varied ways, cycled through in
turn: unknown sampler or schedule type, steps 0 or past the limit, a NaN ``cfg_scale`` in the raw
body, broken JSON, a JSON array, a form-encoded body, broken base64 or a non-image as the init image,
a PNG header claiming 20000x20000 pixels, a data URL without a comma, the wrong width, a batch over
the limit, an unknown class or model, a wrong type, a missing ``init_images``, a body over the
server's limit (declared and chunked), an unknown route and a wrong method. About 5% are
``GET /sdapi/v1/progress``; the rest are valid txt2img and img2img requests (some inpainting) with
``--steps`` steps (default 10-20), every sampler and several schedule types, a class or none, a
negative class, batch 1 or 2. The same request list, shuffled once (``--seed``), is sent in every
round.

Reports, per round and overall: the count of each status code, latency percentiles (p50, p99, max)
for valid generation requests that were served (200), those turned away by the full queue (429),
the malformed ones and the progress calls, requests/s, and for each kind of malformed request the
codes it got. Also the server's resident memory (``VmRSS`` of /proc/PID/status) after start-up,
after a warm-up (one request per sampler), and after each round, with the growth per round: when the
last round grows by less than 20 MB or 10% of the first round's growth, memory is "bounded". Before
the load, the idle server's latency floor: a cheap GET one at a time on one kept-alive connection and
on a new connection each (when the first is ~40 ms slower, the server's sockets lack TCP_NODELAY).
Prints a table; ``--json FILE`` writes every figure, with the requests that broke the rules.

The server's ``--queue-size`` defaults to ``--concurrency``, so that every valid request is served
and its latency is the wait in the queue plus the sampling; a smaller one (the server's own default
is 4) turns most valid requests away with a 429, whose latency is reported apart.

Exits with status 1 when any response is a 5xx, any request fails to connect or times out
(``--timeout``), a valid request gets anything but 200 or 429 (or a 200 without its images), or a
malformed one gets anything but a 4xx; the first few such requests and responses are printed, and
the server's log is kept (its path is printed). An error response that is not the contract's JSON
``{"error": ..., "detail": ...}`` is listed as a deviation, and fails the run only with ``--strict``.
Figures depend on the machine (its CPU model is printed) and on what else runs on it; the server's
torch uses ``--threads`` threads (default 1: on a busy 2-core machine more threads stall).

    python benchmarks/serve_load.py [--requests 300] [--concurrency 16] [--malformed-fraction 0.2]
        [--checkpoint RUN] [--steps 10-20] [--queue-size N] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx

BODY_LIMIT_MB = 4.0  # passed to the server as --max-body-mb; the oversized requests exceed it
MAX_BATCH_SIZE = 16  # the server's --max-batch-size
MAX_STEPS = 1000  # the server's --max-steps
PROGRESS_FRACTION = 0.05  # of the requests: GET /sdapi/v1/progress
BOUNDED_MB = 20.0  # the last round's RSS growth below this (or below BOUNDED_RATIO of the first's) is bounded
BOUNDED_RATIO = 0.10
START_TIMEOUT = 180.0  # seconds for the server to answer its first request
SCHEDULERS = ("Automatic", "Karras", "Uniform", "Exponential", "SGM Uniform")
SHOWN_FAILURES = 8
IDLE_PROBES = 20  # GET /sdapi/v1/progress one at a time after the warm-up, on each kind of connection


# --- the model and the server ------------------------------------------------------------------------------


def write_tiny_model(folder: Path, num_classes: int = 10) -> Path:
    """A randomly initialised class-conditional 'tiny' UNet (1x16x16), saved as a run folder."""
    import torch

    from inkwash.checkpoint import save_checkpoint
    from inkwash.core.schedule import ScheduleConfig
    from inkwash.core.unet import UNet, preset

    torch.manual_seed(0)
    model = UNet(preset("tiny", num_classes=num_classes))
    with torch.no_grad():  # the output layers start at zero; randomise them so the model does something
        for p in model.out_conv.parameters():
            p.normal_(0, 0.05)
        for module in model.modules():
            if hasattr(module, "conv2"):
                module.conv2.weight.normal_(0, 0.02)
    model.eval()
    size, channels = model.config.image_size, model.config.in_channels
    config = {
        "unet": model.config.to_dict(),
        "schedule": ScheduleConfig().to_dict(),
        "prediction": "eps",
        "data": {
            "source": "serve_load",
            "shape": [channels, size, size],
            "num_images": 0,
            "class_names": [str(i) for i in range(num_classes)],
        },
        "step": 0,
    }
    save_checkpoint(folder, config, model, model)
    return folder


class Server:
    """``inkwash serve`` in a subprocess on a free port, its output in a log file."""

    def __init__(self, checkpoint: str, queue_size: int, threads: int, log_path: Path) -> None:
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        command = [
            sys.executable,
            "-m",
            "inkwash",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            "0",
            "--queue-size",
            str(queue_size),
            "--max-body-mb",
            str(BODY_LIMIT_MB),
            "--max-batch-size",
            str(MAX_BATCH_SIZE),
            "--max-steps",
            str(MAX_STEPS),
            "--device",
            "cpu",
        ]
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = ""

    def wait_ready(self) -> None:
        """Until the log names the port and ``GET /sdapi/v1/samplers`` answers 200."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"serve_load.py: the server exited with status {self.process.returncode}:\n{self.tail()}"
                )
            if not self.url:
                found = re.search(r"inkwash serve: (http://[\d.]+:\d+)/", self.log_path.read_text(errors="replace"))
                if found:
                    self.url = found.group(1)
            if self.url:
                try:
                    if httpx.get(f"{self.url}/sdapi/v1/samplers", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise SystemExit(f"serve_load.py: the server did not answer within {START_TIMEOUT:.0f} s:\n{self.tail()}")

    def rss_mb(self) -> float:
        """The server process's resident memory (VmRSS), in MiB."""
        return _status_kb(self.process.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return _status_kb(self.process.pid, "VmHWM") / 1024

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Ctrl+C, as a user stops it; killed if it has not exited within 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def machine_label() -> str:
    """lscpu's model name (the CPU), or the next best thing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- the requests ------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request: ``kind`` is valid, malformed or progress; ``variant`` names what it does."""

    kind: str
    variant: str
    method: str
    path: str
    body: bytes | None = None
    content_type: str = "application/json"
    chunked: bool = False  # send the body without a Content-Length

    def describe(self) -> str:
        body = "" if self.body is None else self.body[:300].decode("utf-8", "replace")
        more = f" ... ({len(self.body)} bytes)" if self.body is not None and len(self.body) > 300 else ""
        how = "" if self.body is None else f"; {self.content_type}" + (", chunked" if self.chunked else "")
        return f"{self.method} {self.path} [{self.variant}{how}] {body}{more}"


def png_base64(pixels: bytes, size: int, mode: str = "L") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes(mode, (size, size), pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_header_only(width: int, height: int) -> str:
    """A PNG signature and IHDR chunk claiming width x height, with no pixel data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk + end).decode("ascii")


def _json(payload: object) -> bytes:
    return json.dumps(payload).encode()


def malformed_specs(model: dict, init: str, steps: int) -> list[Spec]:
    """One of each kind of bad request."""
    size = model["width"]
    txt = "/sdapi/v1/txt2img"
    img = "/sdapi/v1/img2img"
    base = {"prompt": model["classes"][0] if model["classes"] else "", "steps": steps, "sampler_name": "Euler"}
    oversized = int(BODY_LIMIT_MB * 1024 * 1024) + 256 * 1024
    big = _json({**base, "init_images": ["A" * oversized]})
    return [
        Spec("malformed", "unknown_sampler", "POST", txt, _json({**base, "sampler_name": "Euler z 9000"})),
        Spec("malformed", "unknown_scheduler", "POST", txt, _json({**base, "scheduler": "Polyexponential"})),
        Spec("malformed", "steps_zero", "POST", txt, _json({**base, "steps": 0})),
        Spec("malformed", "steps_over_limit", "POST", txt, _json({**base, "steps": MAX_STEPS * 100})),
        Spec("malformed", "nan_cfg_scale", "POST", txt, b'{"prompt": "", "steps": %d, "cfg_scale": NaN}' % steps),
        Spec("malformed", "infinite_seed", "POST", txt, b'{"steps": %d, "seed": Infinity}' % steps),
        Spec("malformed", "broken_json", "POST", txt, b'{"prompt": "1", "steps": 1'),
        Spec("malformed", "json_array", "POST", txt, b"[1, 2, 3]"),
        Spec("malformed", "empty_body", "POST", txt, b""),
        Spec(
            "malformed",
            "form_body",
            "POST",
            txt,
            b"prompt=1&steps=10",
            content_type="application/x-www-form-urlencoded",
        ),
        Spec("malformed", "wrong_type_steps", "POST", txt, _json({**base, "steps": "many"})),
        Spec("malformed", "wrong_width", "POST", txt, _json({**base, "width": size * 4})),
        Spec("malformed", "batch_over_limit", "POST", txt, _json({**base, "batch_size": MAX_BATCH_SIZE + 1})),
        Spec("malformed", "negative_seed", "POST", txt, _json({**base, "seed": -7})),
        Spec("malformed", "unknown_class", "POST", txt, _json({**base, "prompt": "no such class"})),
        Spec(
            "malformed",
            "unknown_model",
            "POST",
            txt,
            _json({**base, "override_settings": {"sd_model_checkpoint": "no-such-model"}}),
        ),
        Spec("malformed", "broken_base64_init", "POST", img, _json({**base, "init_images": ["%%%not-base64%%%"]})),
        Spec(
            "malformed",
            "not_an_image_init",
            "POST",
            img,
            _json({**base, "init_images": [base64.b64encode(b"hello, not a png" * 8).decode()]}),
        ),
        Spec(
            "malformed",
            "huge_png_header_init",
            "POST",
            img,
            _json({**base, "init_images": [png_header_only(20000, 20000)]}),
        ),
        Spec("malformed", "data_url_no_comma", "POST", img, _json({**base, "init_images": ["data:image/png;base64"]})),
        Spec("malformed", "missing_init_images", "POST", img, _json(base)),
        Spec("malformed", "broken_base64_mask", "POST", img, _json({**base, "init_images": [init], "mask": "@@"})),
        Spec(
            "malformed",
            "denoising_over_1",
            "POST",
            img,
            _json({**base, "init_images": [init], "denoising_strength": 2}),
        ),
        Spec("malformed", "oversized_body", "POST", img, big),
        Spec("malformed", "oversized_chunked", "POST", img, big, chunked=True),
        Spec("malformed", "unknown_route", "GET", "/sdapi/v1/no-such-route"),
        Spec("malformed", "wrong_method", "GET", txt),
    ]


def valid_spec(
    rng: random.Random, model: dict, samplers: list[str], steps: tuple[int, int], init: str, mask: str
) -> Spec:
    classes = model["classes"]
    payload: dict = {
        "prompt": rng.choice([*classes, ""]) if classes else "",
        "steps": rng.randint(*steps),
        "sampler_name": rng.choice(samplers),
        "scheduler": rng.choice(SCHEDULERS),
        "cfg_scale": round(rng.uniform(1, 5), 2),
        "seed": rng.randrange(2**32),
        "batch_size": rng.choice((1, 1, 1, 2)),
    }
    if classes and rng.random() < 0.2:
        payload["negative_prompt"] = rng.choice(classes)
    if rng.random() < 0.3:
        payload.update(init_images=[init], denoising_strength=round(rng.uniform(0.3, 0.9), 2))
        variant = "img2img"
        if rng.random() < 0.4:
            payload.update(mask=mask, mask_blur=rng.choice((0, 1, 4)))
            variant = "inpaint"
        return Spec("valid", variant, "POST", "/sdapi/v1/img2img", _json(payload))
    return Spec("valid", "txt2img", "POST", "/sdapi/v1/txt2img", _json(payload))


def build_load(args, model: dict, samplers: list[str]) -> tuple[list[Spec], list[Spec]]:
    """The load (shuffled) and a warm-up of one valid request per sampler."""
    rng = random.Random(args.seed)
    size = model["width"]
    pixel_count = size * model["height"]
    init = png_base64(bytes(rng.randrange(256) for _ in range(pixel_count)), size)
    mask = png_base64(bytes(255 if (i % size) >= size // 2 else 0 for i in range(pixel_count)), size)
    bad = malformed_specs(model, init, args.steps[0])
    n_bad = round(args.requests * args.malformed_fraction)
    n_progress = min(args.requests - n_bad, max(1, round(args.requests * PROGRESS_FRACTION)))
    n_valid = args.requests - n_bad - n_progress
    load = [bad[i % len(bad)] for i in range(n_bad)]
    for i in range(n_progress):
        query = "?skip_current_image=true" if i % 2 else ""
        load.append(Spec("progress", "progress", "GET", f"/sdapi/v1/progress{query}"))
    load += [valid_spec(rng, model, samplers, args.steps, init, mask) for _ in range(n_valid)]
    rng.shuffle(load)
    warmup = []
    for name in samplers:
        payload = {"prompt": "", "steps": args.steps[0], "sampler_name": name, "seed": 0}
        warmup.append(Spec("valid", "warmup", "POST", "/sdapi/v1/txt2img", _json(payload)))
    payload = {"steps": args.steps[0], "init_images": [init], "mask": mask, "denoising_strength": 0.5, "seed": 0}
    warmup.append(Spec("valid", "warmup", "POST", "/sdapi/v1/img2img", _json(payload)))
    return load, warmup


# --- sending ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    spec: Spec
    status: int | None  # None: no response (connection error or timeout)
    seconds: float
    error: str = ""  # the transport error, when there was no response
    body: str = ""  # the response's first characters, kept for failures
    problem: str = ""  # what breaks the rules, if anything
    severe: bool = False  # a failure (exit status 1) rather than a deviation from the error-body contract


async def _chunks(data: bytes, size: int = 64 * 1024):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def check(spec: Spec, status: int, response: httpx.Response) -> tuple[str, bool]:
    """What is wrong with this response ("" when nothing), and whether it is a failure (True) or only a
    deviation from the contract's error body (False)."""
    if status >= 500:
        return f"a {status}", True
    if spec.kind == "valid" and status not in (200, 429):
        return f"a valid request got {status}", True
    if spec.kind == "progress" and status != 200:
        return f"progress got {status}", True
    if spec.kind == "malformed" and not 400 <= status < 500:
        return f"a malformed request got {status}", True
    try:
        body = response.json()
    except ValueError:
        return "the response is not JSON", status < 400
    if status >= 400:
        if not isinstance(body, dict) or not isinstance(body.get("error"), str) or "detail" not in body:
            return 'the error body is not {"error": ..., "detail": ...}', False
    elif spec.kind == "valid":
        request = json.loads(spec.body or b"{}")
        if not isinstance(body, dict) or len(body.get("images", [])) != request.get("batch_size", 1):
            return "a 200 without the images asked for", True
    return "", False


async def send(client: httpx.AsyncClient, spec: Spec) -> Outcome:
    headers = {"content-type": spec.content_type} if spec.body is not None else {}
    content = _chunks(spec.body) if spec.chunked and spec.body is not None else spec.body
    start = time.perf_counter()
    try:
        response = await client.request(spec.method, spec.path, content=content, headers=headers)
    except httpx.TimeoutException as exc:
        return Outcome(spec, None, time.perf_counter() - start, f"timeout ({type(exc).__name__})")
    except httpx.TransportError as exc:
        return Outcome(spec, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    problem, severe = check(spec, response.status_code, response)
    body = response.text[:500] if problem else ""
    return Outcome(spec, response.status_code, seconds, body=body, problem=problem, severe=severe)


async def run_load(url: str, specs: list[Spec], concurrency: int, timeout: float) -> tuple[list[Outcome], float]:
    """Send every spec with at most ``concurrency`` in flight; the outcomes and the wall time."""
    pending = iter(specs)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for spec in pending:  # the iterator is shared: each loop takes the next spec
            outcomes.append(await send(client, spec))

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return outcomes, time.perf_counter() - start


def idle_probe(url: str, timeout: float) -> dict:
    """Latency of GET /sdapi/v1/progress on the idle server, one at a time: on one kept-alive connection
    (the first request, which opens it, left out) and on a new connection for each request."""
    path = "/sdapi/v1/progress?skip_current_image=true"
    keep_alive, new_connection = [], []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        client.get(path)
        for _ in range(IDLE_PROBES):
            start = time.perf_counter()
            client.get(path).raise_for_status()
            keep_alive.append(time.perf_counter() - start)
    for _ in range(IDLE_PROBES):
        with httpx.Client(base_url=url, timeout=timeout) as client:
            start = time.perf_counter()
            client.get(path).raise_for_status()
            new_connection.append(time.perf_counter() - start)
    return {"keep_alive": latency(keep_alive), "new_connection": latency(new_connection)}


# --- summaries ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms, default=None)}


LATENCY_GROUPS = {
    "valid_200": lambda o: o.spec.kind == "valid" and o.status == 200,
    "valid_429": lambda o: o.spec.kind == "valid" and o.status == 429,
    "valid_all": lambda o: o.spec.kind == "valid" and o.status is not None,
    "malformed": lambda o: o.spec.kind == "malformed" and o.status is not None,
    "progress": lambda o: o.spec.kind == "progress" and o.status is not None,
}


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    codes: dict[str, int] = {}
    variants: dict[str, dict[str, int]] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "no response"
        codes[key] = codes.get(key, 0) + 1
        if o.spec.kind == "malformed":
            per = variants.setdefault(o.spec.variant, {})
            per[key] = per.get(key, 0) + 1
    statuses = [o.status for o in outcomes if o.status is not None]
    return {
        "requests": len(outcomes),
        "wall_s": wall,
        "requests_per_s": len(outcomes) / wall if wall > 0 else None,
        "images_per_s": sum(
            json.loads(o.spec.body or b"{}").get("batch_size", 1)
            for o in outcomes
            if o.spec.kind == "valid" and o.status == 200
        )
        / wall
        if wall > 0
        else None,
        "status_counts": dict(sorted(codes.items())),
        "2xx": sum(200 <= s < 300 for s in statuses),
        "4xx": {str(c): statuses.count(c) for c in sorted({s for s in statuses if 400 <= s < 500})},
        "5xx": sum(s >= 500 for s in statuses),
        "connection_errors": sum(o.status is None and not o.error.startswith("timeout") for o in outcomes),
        "timeouts": sum(o.status is None and o.error.startswith("timeout") for o in outcomes),
        "latency": {name: latency([o.seconds for o in outcomes if rule(o)]) for name, rule in LATENCY_GROUPS.items()},
        "malformed_variants": dict(sorted(variants.items())),
        "kinds": {kind: sum(o.spec.kind == kind for o in outcomes) for kind in ("valid", "malformed", "progress")},
    }


def failures(outcomes: list[Outcome], severe: bool = True) -> list[dict]:
    """The requests that failed (no response, a 5xx, a status outside the rules), or with ``severe=False``
    the deviations (error bodies not in the contract's shape)."""
    found = []
    for o in outcomes:
        if (o.status is None or o.severe) if severe else (o.problem and not o.severe):
            found.append(
                {
                    "request": o.spec.describe(),
                    "status": o.status,
                    "problem": o.problem or o.error,
                    "response": o.body,
                    "seconds": round(o.seconds, 3),
                }
            )
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_round(index: int, summary: dict, rss: dict) -> None:
    codes = ", ".join(f"{code}: {n}" for code, n in summary["status_counts"].items())
    print(
        f"round {index}: {summary['requests']} requests in {summary['wall_s']:.1f} s = "
        f"{summary['requests_per_s']:.1f} req/s ({summary['images_per_s']:.1f} images/s); {codes}"
    )
    print(
        f"  5xx {summary['5xx']}, connection errors {summary['connection_errors']}, timeouts {summary['timeouts']}; "
        f"RSS {rss['start_mb']:.1f} -> {rss['end_mb']:.1f} MiB ({rss['growth_mb']:+.1f})"
    )
    print(f"  {'latency (ms)':16s} {'n':>5s} {'p50':>7s} {'p99':>7s} {'max':>7s}")
    for name, entry in summary["latency"].items():
        print(
            f"  {name:16s} {entry['n']:5d} {_ms(entry['p50_ms']):>7s} {_ms(entry['p99_ms']):>7s} "
            f"{_ms(entry['max_ms']):>7s}"
        )


def parse_steps(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        steps = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= steps[0] <= steps[1] <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"steps must satisfy 1 <= MIN <= MAX <= {MAX_STEPS}, got {text!r}")
    return steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per round (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    parser.add_argument(
        "--malformed-fraction", type=float, default=0.2, help="of the requests, bad ones (default: %(default)s)"
    )
    parser.add_argument("--checkpoint", default=None, help="a run folder to serve (default: a tiny random model)")
    parser.add_argument(
        "--steps",
        type=parse_steps,
        default="10-20",
        help="steps of valid requests: N or MIN-MAX (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=None,
        help="the server's --queue-size (default: --concurrency, so every valid request is served; less gives 429s)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="identical rounds of the load (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="of the request mix (default: %(default)s)")
    parser.add_argument("--keep-log", default=None, help="copy the server's log here")
    parser.add_argument(
        "--strict", action="store_true", help="also fail on error bodies that are not the contract's JSON shape"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.queue_size is None:
        args.queue_size = args.concurrency
    if min(args.requests, args.concurrency, args.queue_size, args.rounds, args.threads) < 1:
        parser.error("--requests, --concurrency, --queue-size, --rounds and --threads must be at least 1")
    if not 0 <= args.malformed_fraction <= 1:
        parser.error("--malformed-fraction must be in 0..1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such folder")
    return args


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    machine = machine_label()
    workdir = Path(tempfile.mkdtemp(prefix="serve_load_"))
    checkpoint = args.checkpoint or str(write_tiny_model(workdir / "tiny"))
    server = Server(checkpoint, args.queue_size, args.threads, workdir / "server.log")
    result: dict = {}
    failed: list[dict] = []
    deviations: list[dict] = []
    try:
        server.wait_ready()
        model = httpx.get(f"{server.url}/inkwash/v1/model", timeout=30).json()
        samplers = [item["name"] for item in httpx.get(f"{server.url}/sdapi/v1/samplers", timeout=30).json()]
        load, warmup = build_load(args, model, samplers)
        rss_before = server.rss_mb()
        print(f"machine: {machine}; python {platform.python_version()}; server torch threads {args.threads}")
        print(
            f"server: {server.url}, pid {server.process.pid}, model {model['name']} "
            f"({model['channels']}x{model['height']}x{model['width']}, {len(model['classes'])} classes), "
            f"queue size {args.queue_size}"
        )
        print(
            f"load: {len(load)} requests per round ({sum(s.kind == 'valid' for s in load)} valid, "
            f"{sum(s.kind == 'malformed' for s in load)} malformed, {sum(s.kind == 'progress' for s in load)} "
            f"progress), concurrency {args.concurrency}, steps {args.steps[0]}-{args.steps[1]}, "
            f"{args.rounds} rounds"
        )
        warm, _ = asyncio.run(run_load(server.url, warmup, 1, args.timeout))
        idle_latency = idle_probe(server.url, args.timeout)
        failed += failures(warm)
        deviations += failures(warm, severe=False)
        rss_warm = server.rss_mb()
        print(
            f"RSS: {rss_before:.1f} MiB after start-up, {rss_warm:.1f} MiB after the warm-up ({len(warmup)} requests)"
        )
        keep, fresh = idle_latency["keep_alive"], idle_latency["new_connection"]
        print(
            f"idle server, GET /sdapi/v1/progress one at a time, p50/p99 ms: {_ms(keep['p50_ms'])}/"
            f"{_ms(keep['p99_ms'])} on one keep-alive connection, {_ms(fresh['p50_ms'])}/{_ms(fresh['p99_ms'])} "
            f"on a new connection each"
        )
        if keep["p50_ms"] is not None and fresh["p50_ms"] is not None and keep["p50_ms"] > fresh["p50_ms"] + 30:
            print(
                "  (about 40 ms more on a kept-alive connection is Nagle's algorithm meeting delayed ACKs: "
                "the server's sockets lack TCP_NODELAY, and the requests below pay it too)"
            )
        rounds = []
        all_outcomes: list[Outcome] = []
        rss_start = rss_warm
        for index in range(1, args.rounds + 1):
            outcomes, wall = asyncio.run(run_load(server.url, load, args.concurrency, args.timeout))
            rss_end = server.rss_mb()
            summary = summarize(outcomes, wall)
            rss = {"start_mb": rss_start, "end_mb": rss_end, "growth_mb": rss_end - rss_start}
            summary["rss"] = rss
            rounds.append(summary)
            all_outcomes += outcomes
            failed += failures(outcomes)
            deviations += failures(outcomes, severe=False)
            print_round(index, summary, rss)
            rss_start = rss_end
        growth = [r["rss"]["growth_mb"] for r in rounds]
        bounded = None
        if len(growth) >= 2:
            bounded = growth[-1] < BOUNDED_MB or growth[-1] < BOUNDED_RATIO * max(growth[0], 0)
        total = summarize(all_outcomes, sum(r["wall_s"] for r in rounds))
        rss_end = server.rss_mb()
        rss_summary = {
            "after_startup_mb": rss_before,
            "after_warmup_mb": rss_warm,
            "end_mb": rss_end,
            "peak_mb": server.peak_rss_mb(),
            "growth_since_warmup_mb": rss_end - rss_warm,
            "growth_per_round_mb": growth,
            "bounded": bounded,
        }
        verdict = "bounded" if bounded else ("unbounded?" if bounded is not None else "(one round: no verdict)")
        print(
            f"RSS per round: {', '.join(f'{g:+.1f}' for g in growth)} MiB -> {verdict}; "
            f"end {rss_end:.1f} MiB, peak {rss_summary['peak_mb']:.1f} MiB"
        )
        lat = total["latency"]
        print(
            f"all rounds: {total['requests']} requests, {total['requests_per_s']:.1f} req/s; 2xx {total['2xx']}, "
            f"4xx {total['4xx']}, 5xx {total['5xx']}, connection errors {total['connection_errors']}, "
            f"timeouts {total['timeouts']}"
        )
        print(
            f"  p50/p99 ms: valid served {_ms(lat['valid_200']['p50_ms'])}/{_ms(lat['valid_200']['p99_ms'])}, "
            f"valid 429 {_ms(lat['valid_429']['p50_ms'])}/{_ms(lat['valid_429']['p99_ms'])}, "
            f"malformed {_ms(lat['malformed']['p50_ms'])}/{_ms(lat['malformed']['p99_ms'])}, "
            f"progress {_ms(lat['progress']['p50_ms'])}/{_ms(lat['progress']['p99_ms'])}"
        )
        kinds = [
            f"{name}:{','.join(f'{c}x{n}' for c, n in per.items())}"
            for name, per in total["malformed_variants"].items()
        ]
        print("  malformed requests, by kind (status x count):")
        print(textwrap.fill("; ".join(kinds), 110, initial_indent="    ", subsequent_indent="    "))
        result = {
            "machine": machine,
            "python": platform.python_version(),
            "config": {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "malformed_fraction": args.malformed_fraction,
                "steps": list(args.steps),
                "queue_size": args.queue_size,
                "rounds": args.rounds,
                "threads": args.threads,
                "seed": args.seed,
                "timeout_s": args.timeout,
                "checkpoint": args.checkpoint,
                "model": {k: model[k] for k in ("name", "width", "height", "channels")},
                "warmup_requests": len(warmup),
            },
            "idle_latency": idle_latency,
            "rounds": rounds,
            "total": total,
            "rss": rss_summary,
        }
    finally:
        server.stop()
        if args.keep_log:
            shutil.copy(server.log_path, args.keep_log)
    errors_in_log = [line for line in server.log_path.read_text(errors="replace").splitlines() if "Traceback" in line]
    runtime = time.perf_counter() - began
    ok = not failed and bool(result)
    ok = ok and not (args.strict and deviations)
    result.update(
        failures=failed,
        deviations=deviations,
        ok=ok,
        server_log_tracebacks=len(errors_in_log),
        runtime_s=runtime,
    )
    for title, items in (("failures", failed), ("deviations from the error-body contract", deviations)):
        if items:
            print(f"{title}: {len(items)} requests; the first of each kind:")
        shown: set[str] = set()
        for item in items:
            key = f"{item['problem']} {item['request'][:60]}"
            if key not in shown and len(shown) < SHOWN_FAILURES:
                shown.add(key)
                print(f"  {item['problem']}: {item['request']}\n    -> {item['status']} {item['response']}")
    verdict = "OK" if ok else f"FAILED ({len(failed)} failures" + (", --strict" if args.strict else "") + ")"
    print(f"runtime {runtime:.1f} s; {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"server log: {server.log_path}")
        sys.exit(1)


if __name__ == "__main__":
    main()
