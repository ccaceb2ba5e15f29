"""The Stable Diffusion WebUI's names and formats, translated to inkwash's: sampler and schedule-type names,
the ``parameters`` text ("infotext") written into every PNG and read back by "PNG info", base64 images,
and the WebUI's mask blur and inpainting fill."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from PIL import Image, PngImagePlugin

from inkwash.sampling.samplers import SAMPLERS, SamplerInfo

try:
    VERSION = f"inkwash {version('inkwash')}"
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "inkwash (source)"

# The largest decoded image accepted, in pixels (a PNG bomb of a few KB can claim gigapixels).
MAX_IMAGE_PIXELS = 4096 * 4096


class FieldError(ValueError):
    """A request field with a bad value: the server answers 422 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


# --- samplers -----------------------------------------------------------------------------------------


def sampler_aliases(info: SamplerInfo) -> list[str]:
    """The other names a client may use for a sampler: inkwash's id and the WebUI's k-diffusion alias."""
    k_name = {"euler_ancestral": "k_euler_a", "dpm_2_ancestral": "k_dpm_2_a", "dpmpp_2s_ancestral": "k_dpmpp_2s_a"}
    aliases = [info.id]
    if info.id not in ("ddpm", "ddim", "plms", "unipc"):
        aliases.append(k_name.get(info.id, f"k_{info.id}"))
    if info.id == "euler_ancestral":
        aliases.append("k_euler_ancestral")
    return aliases


def sampler_list() -> list[dict]:
    """``GET /sdapi/v1/samplers``: the WebUI's shape."""
    return [{"name": info.display_name, "aliases": sampler_aliases(info), "options": {}} for info in SAMPLERS.values()]


# --- schedule types --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleType:
    name: str  # the WebUI's id, e.g. "sgm_uniform"
    label: str  # the WebUI's label, e.g. "SGM Uniform"
    schedule: str | None  # inkwash's step schedule; None: the sampler's own (Automatic)
    default_rho: float = -1
    aliases: tuple[str, ...] = ()


# The WebUI's schedule types that have an inkwash counterpart. Uniform and Normal space timesteps evenly
# from the first to the last (inkwash's uniform); SGM Uniform and Simple count back from T in equal
# strides (trailing); DDIM takes multiples of T // steps (leading; the WebUI adds 1 to each timestep).
SCHEDULE_TYPES = (
    ScheduleType("automatic", "Automatic", None),
    ScheduleType("uniform", "Uniform", "uniform"),
    ScheduleType("karras", "Karras", "karras", default_rho=7.0),
    ScheduleType("exponential", "Exponential", "exponential"),
    ScheduleType("sgm_uniform", "SGM Uniform", "trailing", aliases=("SGMUniform",)),
    ScheduleType("simple", "Simple", "trailing"),
    ScheduleType("normal", "Normal", "uniform"),
    ScheduleType("ddim", "DDIM", "leading"),
)
# The WebUI's schedule types with no counterpart: a 422 names them.
UNSUPPORTED_SCHEDULES = ("Polyexponential", "KL Optimal", "Align Your Steps", "Beta", "Karras Exponential")


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.lower())


def schedule_list() -> list[dict]:
    """``GET /sdapi/v1/schedulers``: the WebUI's shape."""
    return [
        {
            "name": kind.name,
            "label": kind.label,
            "aliases": list(kind.aliases) or None,
            "default_rho": kind.default_rho,
            "need_inner_model": kind.schedule in ("uniform", "leading", "trailing"),
        }
        for kind in SCHEDULE_TYPES
    ]


def resolve_schedule(name: str | None) -> ScheduleType:
    """A schedule type by its WebUI name, label or alias, in any case; None or "" is Automatic."""
    if not name:
        return SCHEDULE_TYPES[0]
    key = _key(name)
    for kind in SCHEDULE_TYPES:
        if key in {_key(kind.name), _key(kind.label), *map(_key, kind.aliases)}:
            return kind
    if key in map(_key, UNSUPPORTED_SCHEDULES):
        raise FieldError("scheduler", f"{name!r} has no counterpart in inkwash")
    labels = ", ".join(kind.label for kind in SCHEDULE_TYPES)
    raise FieldError("scheduler", f"unknown schedule type {name!r}; choose from {labels}")


def resolve_sampler(name: str, field: str = "sampler_name") -> tuple[SamplerInfo, ScheduleType | None]:
    """A sampler by its WebUI name, id or alias. Names from WebUIs before 1.9 carry the schedule type
    ("DPM++ 2M Karras"); that schedule type is returned beside the sampler (None when there is none)."""
    key = _key(name)
    for info in SAMPLERS.values():
        if key in {_key(info.display_name), *map(_key, sampler_aliases(info))}:
            return info, None
    for kind in SCHEDULE_TYPES[1:]:
        suffix = _key(kind.label)
        if key.endswith(suffix) and len(key) > len(suffix):
            try:
                return resolve_sampler(key[: -len(suffix)], field)[0], kind
            except FieldError:
                pass
    names = ", ".join(info.display_name for info in SAMPLERS.values())
    raise FieldError(field, f"unknown sampler {name!r}; choose from {names}")


# --- infotexts -------------------------------------------------------------------------------------------


def _format_value(value: object) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if any(char in text for char in ',:"\n'):
        return json.dumps(text)
    return text


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The WebUI's ``parameters`` text: the prompt, "Negative prompt: ..." when there is one, then
    ``Key: value`` pairs joined by ", " (values holding a comma, colon or quote are JSON-quoted)."""
    line = ", ".join(f"{key}: {_format_value(value)}" for key, value in params.items() if value is not None)
    head = prompt + (f"\nNegative prompt: {negative_prompt}" if negative_prompt else "")
    return f"{head}\n{line}".strip()


_PAIR = re.compile(r'\s*([\w ()\-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_value(text: str) -> object:
    if text.startswith('"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if kind is int or math.isfinite(value) else text
    return text


def parse_infotext(text: str) -> dict:
    """The fields of a ``parameters`` text, as the WebUI's PNG info gives them: "Prompt", "Negative
    prompt", each ``Key: value`` of the last line, and "Size-1" / "Size-2" split from "Size: WxH"."""
    lines = text.strip().split("\n")
    params_line = ""
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result: dict = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(params_line):
        key, parsed = key.strip(), _parse_value(value.strip())
        size = re.fullmatch(r"(\d+)x(\d+)", str(parsed))
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = int(size[1]), int(size[2])
        else:
            result[key] = parsed
    return result


# --- images ----------------------------------------------------------------------------------------------


def decode_image(data: str, field: str) -> Image.Image:
    """A base64 image (with or without a ``data:image/...;base64,`` prefix), fully decoded."""
    if not isinstance(data, str) or not data:
        raise FieldError(field, "expected a base64-encoded image")
    if data.startswith("data:"):
        _, sep, data = data.partition(",")
        if not sep:
            raise FieldError(field, "a data URL without a comma")
    compact = "".join(data.split())  # base64 wrapped at 76 columns (MIME, the base64 tool) is common
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise FieldError(field, f"the image is {image.width}x{image.height}; the most is {MAX_IMAGE_PIXELS} pixels")
        image.load()
    except FieldError:
        raise
    except Image.UnidentifiedImageError:
        raise FieldError(field, f"not an image ({len(raw)} bytes of an unknown format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = re.sub(r"<[^>]*>", "the image", str(exc).splitlines()[0]) if str(exc) else "unknown error"
        raise FieldError(field, f"not a readable image ({reason})") from None
    return image


def encode_png(pixels: np.ndarray, infotext: str | None = None) -> str:
    """Base64 of a PNG of uint8 (H, W, C) pixels, with a ``parameters`` text chunk when given."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    info = None
    if infotext is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_channel(image: Image.Image) -> Image.Image:
    """The mask's values as one channel: its alpha when it has transparency that is used (strokes drawn
    on a transparent layer, as the WebUI reads them), else its luminance."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return image.convert("L")


def png_text(image: Image.Image) -> dict[str, str]:
    """The text chunks of a decoded image (empty for formats without them)."""
    texts = dict(getattr(image, "text", {}) or {})
    return {str(key): str(value) for key, value in texts.items()}


# --- masks -----------------------------------------------------------------------------------------------


def _kernel(sigma: float) -> np.ndarray:
    """The WebUI's Gaussian kernel (OpenCV's ``GaussianBlur`` with size 2 * int(2.5 * sigma + 0.5) + 1)."""
    radius = int(2.5 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(image: np.ndarray, sigma_x: float, sigma_y: float) -> np.ndarray:
    """A separable Gaussian blur of a 2-D array, along x (columns) and y (rows), with OpenCV's default
    border (reflected without repeating the edge pixel, ``BORDER_REFLECT_101``), as the WebUI's."""
    out = image.astype(np.float64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        kernel = _kernel(sigma)
        radius = len(kernel) // 2
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        out = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=axis) @ kernel
    return out


def blur_mask(mask: np.ndarray, blur_x: float, blur_y: float) -> np.ndarray:
    """The WebUI's mask blur: a boolean (H, W) mask (True = regenerate) blurred into an alpha in [0, 1].
    Exactly 0 away from the blurred edge, so that the pixels there are kept exactly."""
    alpha = gaussian_blur(mask.astype(np.float64), blur_x, blur_y)
    alpha[alpha < 1 / 512] = 0.0  # what rounds to 0 in the WebUI's uint8 mask
    return np.clip(alpha, 0.0, 1.0)


def composite(generated: np.ndarray, original: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``original`` where alpha is 0, ``generated`` where it is 1, blended between (uint8 (N, H, W, C))."""
    a = alpha[None, :, :, None]
    mixed = generated.astype(np.float64) * a + original.astype(np.float64) * (1 - a)
    out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return np.where(a > 0, out, original)


def fill_masked(init: np.ndarray, mask: np.ndarray, mode: int, seed: int) -> np.ndarray:
    """The WebUI's ``inpainting_fill`` on a uint8 (H, W, C) init image where ``mask`` (H, W) is set:
    0 fill (the mean colour of the kept pixels), 1 original (unchanged), 2 noise (uniform random
    pixels from ``seed``), 3 nothing (mid-grey, the model's zero)."""
    if mode == 1 or not mask.any():
        return init
    out = init.copy()
    if mode == 0:
        kept = init[~mask]
        out[mask] = kept.mean(axis=0).round().astype(np.uint8) if len(kept) else 128
    elif mode == 2:
        rng = np.random.default_rng(seed)
        out[mask] = rng.integers(0, 256, size=(int(mask.sum()), init.shape[-1]), dtype=np.uint8)
    else:
        out[mask] = 128
    return out
