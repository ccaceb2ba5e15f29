"""The WebUI's request and response bodies, with its field names and defaults (a compatible subset).

Fields that inkwash has no meaning for are accepted, ignored and listed in the response's ``info``
(``ignored_fields``); so are fields that are not declared at all, since WebUI clients send many.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1


class GenerationRequest(BaseModel):
    """The fields that txt2img and img2img share."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field("", description="the class to sample (a class name or index); empty: unconditional")
    negative_prompt: str = Field("", description="a class to steer away from (it replaces the null label in CFG)")
    steps: int = Field(50, ge=1, description="sampler steps")
    sampler_name: str | None = Field(None, description="a WebUI sampler name, e.g. 'DPM++ 2M' or 'Euler a'")
    sampler_index: str = Field("Euler", description="the sampler, when sampler_name is not given (older clients)")
    scheduler: str | None = Field(None, description="schedule type: Automatic, Uniform, Karras, Exponential, ...")
    cfg_scale: float = Field(7.0, ge=0, description="classifier-free guidance scale (class-conditional models)")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="image i uses seed + i; -1: a random seed")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="variation seed; -1: random when subseed_strength > 0")
    subseed_strength: float = Field(0.0, ge=0, le=1, description="how far toward the variation seed's noise")
    batch_size: int = Field(1, ge=1, description="images per batch")
    n_iter: int = Field(1, ge=1, description="number of batches")
    width: int | None = Field(None, ge=1, description="must be the model's width (default)")
    height: int | None = Field(None, ge=1, description="must be the model's height (default)")
    eta: float | None = Field(None, ge=0, description="noise of DDIM and the ancestral and SDE samplers")
    s_churn: float | None = Field(None, ge=0, description="churn of Euler, Heun and DPM2")
    s_tmin: float | None = Field(None, ge=0, description="churn only at sigma >= s_tmin")
    s_tmax: float | None = Field(None, ge=0, description="churn only at sigma <= s_tmax; 0: unbounded")
    s_noise: float | None = Field(None, ge=0, description="scale of the noise the stochastic samplers add")
    override_settings: dict[str, Any] | None = Field(None, description="sd_model_checkpoint picks the model")
    override_settings_restore_afterwards: bool = True
    send_images: bool = Field(True, description="false: the response has no images")
    save_images: bool = Field(False, description="write the PNGs to the server's --save-dir")
    # Accepted for compatibility, with no meaning in inkwash.
    styles: list[str] | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None
    hr_resize_x: int | None = None
    hr_resize_y: int | None = None
    denoising_strength: float | None = None


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(..., min_length=1, description="base64 images (data URLs too)")
    denoising_strength: float = Field(0.75, ge=0, le=1, description="0 returns the input, 1 starts from noise")
    mask: str | None = Field(None, description="base64 mask, white = regenerate, black = keep")
    mask_blur: float | None = Field(None, ge=0, le=64, description="Gaussian blur of the mask edge, in pixels")
    mask_blur_x: float = Field(4, ge=0, le=64)
    mask_blur_y: float = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 noise, 3 nothing")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: black regenerates")
    inpaint_full_res: bool | int = Field(True, description="ignored: the whole image is always inpainted")
    inpaint_full_res_padding: int = 0
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize (2 and 3 unsupported)")
    include_init_images: bool = False
    image_cfg_scale: float | None = None
    initial_noise_multiplier: float | None = None


# The fields that inkwash reads; anything else a client sends is listed in info's ignored_fields.
USED_FIELDS = {
    "prompt",
    "negative_prompt",
    "steps",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "cfg_scale",
    "seed",
    "subseed",
    "subseed_strength",
    "batch_size",
    "n_iter",
    "width",
    "height",
    "eta",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "override_settings",
    "override_settings_restore_afterwards",
    "send_images",
    "save_images",
    "init_images",
    "denoising_strength",
    "mask",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_fill",
    "inpainting_mask_invert",
    "resize_mode",
}


def ignored_fields(request: GenerationRequest) -> list[str]:
    """The fields the client sent that inkwash ignores (txt2img's denoising_strength belongs to hires fix)."""
    sent = set(request.model_fields_set) | set(request.model_extra or {})
    ignored = sent - USED_FIELDS
    if isinstance(request, Txt2ImgRequest) and "denoising_strength" in sent:
        ignored.add("denoising_strength")
    return sorted(ignored)


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with a 'parameters' text chunk")
    parameters: dict[str, Any] = Field(description="the request as received")
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, ignored_fields, ...")


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = Field(..., description="a base64 PNG (data URLs too)")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
