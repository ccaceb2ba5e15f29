"""Write an inkwash checkpoint as a diffusers ``DDPMPipeline`` folder (``model_index.json``, ``unet/`` in
safetensors, ``scheduler/``) that ``DDPMPipeline.from_pretrained`` samples from, and that ``inkwash.load``
reads back as the same model.

The network becomes a ``diffusers.UNet2DModel`` laid out like inkwash's UNet, and its weights are copied by an
explicit name map (``weight_map``) in which every inkwash tensor is used exactly once and every diffusers tensor
is filled. Only an exact mapping is written: a network or schedule that diffusers cannot express is refused
with an ``InkwashError`` naming the reason, and before anything is written both networks are run on one probe
input and both schedules' alpha_bar tables are compared. docs/internals.md lists the mapping rules and what is
refused and why. diffusers is imported only here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from inkwash.checkpoint import load_model, resolve_checkpoint
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.unet import Attention, Downsample, ResBlock, UNet, Upsample
from inkwash.errors import InkwashError
from inkwash.files import fsync_dir
from inkwash.interop.diffusers_folder import BETA_SCHEDULES, INDEX_FILE, PREDICTIONS

# inkwash's names -> diffusers' (the inverses of the maps the diffusers-folder loader reads)
DIFFUSERS_BETA_SCHEDULES = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
DIFFUSERS_PREDICTIONS = {ours: theirs for theirs, ours in PREDICTIONS.items()}
# The probe check: the two networks' outputs on one random input, relative to the largest output entry.
PROBE_TOLERANCE = 1e-4
# diffusers builds its beta / alpha_bar tables in float32; inkwash's are float64.
SCHEDULE_RTOL, SCHEDULE_ATOL = 1e-5, 1e-6

# A weight-map entry: inkwash tensor name -> (diffusers tensor names, how the one becomes the others)
Transform = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _same(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


def _conv1x1_to_linear(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor.flatten(1) if tensor.dim() == 4 else tensor,)  # (out, in, 1, 1) -> (out, in); a bias as it is


def _split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # inkwash's qkv conv holds q, k and v as three consecutive channel blocks, each head-major (head * d + j),
    # which is how diffusers' to_q / to_k / to_v outputs are split into heads.
    return tuple(part.flatten(1) if part.dim() == 4 else part for part in tensor.chunk(3, dim=0))


def _check_exportable(model: UNet, where: str) -> tuple[int, int]:
    """diffusers' ``norm_num_groups`` and ``attention_head_dim`` for ``model``; an InkwashError naming the reason
    where a UNet2DModel cannot hold it exactly."""
    config = model.config
    reason = None
    groups = sorted({m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)})
    head_dims = sorted({m.norm.num_channels // m.heads for m in model.modules() if isinstance(m, Attention)})
    if config.num_classes > 0:
        reason = f"it is class-conditional ({config.num_classes} classes) and DDPMPipeline cannot pass class labels"
    elif config.patch_size != 1:
        reason = (
            f"its patch size is {config.patch_size} and UNet2DModel has no space-to-depth input "
            "(inkwash train --patch-size 1 trains a network that exports)"
        )
    elif config.channel_mult[0] != 1:
        reason = (
            f"channel_mult starts at {config.channel_mult[0]}, not 1: UNet2DModel's input conv and timestep "
            "embedding have the first level's width, inkwash's have base_channels"
        )
    elif config.resolved_out_channels != config.in_channels:
        reason = f"it has {config.resolved_out_channels} output channels for {config.in_channels} input channels"
    elif len(groups) != 1:
        reason = (
            f"its GroupNorm layers use {', '.join(map(str, groups))} groups (each layer's gcd of its channels and "
            f"num_groups={config.num_groups}) and UNet2DModel uses one norm_num_groups for every layer; "
            f"base_channels must be a multiple of num_groups"
        )
    elif len(head_dims) != 1 or any(
        m.heads * head_dims[0] != m.norm.num_channels for m in model.modules() if isinstance(m, Attention)
    ):
        reason = (
            f"its attention layers have heads of {', '.join(map(str, head_dims))} channels and UNet2DModel has one "
            f"attention_head_dim; every attention width must be a multiple of head_channels={config.head_channels}"
        )
    if reason is not None:
        raise InkwashError(f"cannot export {where} to diffusers exactly: {reason}")
    return groups[0], head_dims[0]


def diffusers_unet(model: UNet, where: str = "the model") -> nn.Module:
    """An (uninitialised) ``UNet2DModel`` of ``model``'s layout; an InkwashError where none is exact."""
    from diffusers import UNet2DModel

    config = model.config
    groups, head_dim = _check_exportable(model, where)
    down, res = [], config.image_size
    for _ in config.channel_mult:
        down.append("AttnDownBlock2D" if res in config.attention_resolutions else "DownBlock2D")
        res //= 2
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.resolved_out_channels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple(down),
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # inkwash's embedding is [cos, sin]
        freq_shift=0,  # frequencies exp(-ln(10000) * i / half), as inkwash's
        attention_head_dim=head_dim,
        norm_num_groups=groups,
        attn_norm_num_groups=groups,  # without it, the mid block's attention has no GroupNorm under scale_shift
        norm_eps=1e-6,
        resnet_time_scale_shift="scale_shift",
        downsample_padding=1,
        dropout=config.dropout,
    )


def _module_pairs(ours: str, theirs: str, names: tuple[tuple[str, str], ...]) -> dict[str, tuple[list[str], Transform]]:
    """The weight and bias of each (inkwash, diffusers) pair of submodule names, under the two prefixes."""
    ours, theirs = ours and f"{ours}.", theirs and f"{theirs}."
    return {f"{ours}{a}.{p}": ([f"{theirs}{b}.{p}"], _same) for a, b in names for p in ("weight", "bias")}


def _resblock(block: ResBlock, ours: str, theirs: str) -> dict[str, tuple[list[str], Transform]]:
    names = (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"), ("conv2", "conv2"))
    if isinstance(block.skip, nn.Conv2d):
        names += (("skip", "conv_shortcut"),)
    return _module_pairs(ours, theirs, names)


def _attention(ours: str, theirs: str) -> dict[str, tuple[list[str], Transform]]:
    entries = _module_pairs(ours, theirs, (("norm", "group_norm"),))
    for p in ("weight", "bias"):
        entries[f"{ours}.qkv.{p}"] = ([f"{theirs}.to_{s}.{p}" for s in "qkv"], _split_qkv)
        entries[f"{ours}.proj.{p}"] = ([f"{theirs}.to_out.0.{p}"], _conv1x1_to_linear)
    return entries


def _layers(layers: nn.ModuleList, ours: str, block: str, j: int) -> dict[str, tuple[list[str], Transform]]:
    """One entry of inkwash's ``down`` / ``up`` lists: resblock j (and its attention) of a diffusers block, or
    that block's down / upsampler."""
    entries: dict[str, tuple[list[str], Transform]] = {}
    for index, layer in enumerate(layers):
        name = f"{ours}.{index}"
        if isinstance(layer, ResBlock):
            entries |= _resblock(layer, name, f"{block}.resnets.{j}")
        elif isinstance(layer, Attention):
            entries |= _attention(name, f"{block}.attentions.{j}")
        elif isinstance(layer, Downsample):
            entries |= _module_pairs(name, f"{block}.downsamplers.0", (("conv", "conv"),))
        elif isinstance(layer, Upsample):
            entries |= _module_pairs(name, f"{block}.upsamplers.0", (("conv", "conv"),))
        else:
            raise InkwashError(f"cannot export a {type(layer).__name__} layer ({name}) to diffusers")
    return entries


def weight_map(model: UNet) -> dict[str, tuple[list[str], Transform]]:
    """inkwash tensor name -> (the diffusers ``UNet2DModel`` tensor names it fills, the transform)."""
    config = model.config
    levels = len(config.channel_mult)
    entries = _module_pairs("time_mlp", "time_embedding", (("0", "linear_1"), ("2", "linear_2")))
    entries |= _module_pairs(
        "", "", (("input_conv", "conv_in"), ("out_norm", "conv_norm_out"), ("out_conv", "conv_out"))
    )
    k = 0
    for level in range(levels):  # num_res_blocks resblocks per level, then a downsampler but on the last
        for j in range(config.num_res_blocks + (level != levels - 1)):
            entries |= _layers(model.down[k], f"down.{k}", f"down_blocks.{level}", j)
            k += 1
    entries |= _resblock(model.mid_block1, "mid_block1", "mid_block.resnets.0")
    entries |= _attention("mid_attn", "mid_block.attentions.0")
    entries |= _resblock(model.mid_block2, "mid_block2", "mid_block.resnets.1")
    k = 0
    for level in range(levels):  # diffusers' up_blocks run from the lowest resolution up
        for j in range(config.num_res_blocks + 1):
            entries |= _layers(model.up[k], f"up.{k}", f"up_blocks.{level}", j)
            k += 1
    return entries


def copy_weights(model: UNet, unet: nn.Module) -> None:
    """Fill ``unet`` from ``model`` by ``weight_map``: every inkwash tensor is used once, every diffusers tensor
    filled once, with its own shape."""
    ours, theirs = model.state_dict(), unet.state_dict()
    entries = weight_map(model)
    # The augmentation embedding has no bias and sampling gives it zeros: it adds nothing to an exported model.
    unused = sorted(set(ours) - set(entries) - {"augment_emb.weight"})
    unknown = sorted(set(entries) - set(ours))
    if unused or unknown:
        raise InkwashError(
            f"cannot export to diffusers: inkwash tensors not mapped {unused}, mapped but absent {unknown}"
        )
    filled: dict[str, torch.Tensor] = {}
    for name, (targets, transform) in entries.items():
        for target, tensor in zip(targets, transform(ours[name]), strict=True):
            if target in filled or target not in theirs or theirs[target].shape != tensor.shape:
                raise InkwashError(f"cannot export to diffusers: {name} does not map onto {target} exactly")
            filled[target] = tensor.detach().clone()
    missing = sorted(set(theirs) - set(filled))
    if missing:
        raise InkwashError(
            f"cannot export to diffusers: {len(missing)} UNet2DModel tensors unfilled ({missing[0]}, ...)"
        )
    unet.load_state_dict(filled, strict=True)


def probe_difference(model: UNet, unet: nn.Module, num_steps: int, seed: int = 0) -> float:
    """The largest difference between the two networks' outputs on one random input at random (fractional)
    timesteps, relative to the largest output entry (at least 1)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, config.in_channels, config.image_size, config.image_size, generator=generator)
    t = torch.rand(4, generator=generator) * (num_steps - 1)  # (B,)
    with torch.no_grad():
        expected = model(x, t)
        got = unet(x, t).sample
    return ((got - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


def scheduler_config(schedule: NoiseSchedule, prediction: str, where: str = "the model") -> dict:
    """The ``DDPMScheduler`` settings of ``schedule`` and ``prediction`` (inkwash's sampling defaults: leading
    steps, the denoised estimate clipped to [-1, 1])."""
    config = schedule.config
    if config.beta_schedule not in DIFFUSERS_BETA_SCHEDULES:
        raise InkwashError(
            f"cannot export {where} to diffusers: beta schedule {config.beta_schedule!r} has no diffusers name"
        )
    if prediction not in DIFFUSERS_PREDICTIONS:
        raise InkwashError(f"cannot export {where} to diffusers: prediction {prediction!r} has no diffusers name")
    return {
        "num_train_timesteps": config.num_steps,
        "beta_schedule": DIFFUSERS_BETA_SCHEDULES[config.beta_schedule],
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "rescale_betas_zero_snr": config.zero_terminal_snr,
        "prediction_type": DIFFUSERS_PREDICTIONS[prediction],
        "variance_type": "fixed_small",  # inkwash's DDPM default: the posterior variance beta_tilde
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }


def _check_schedule(scheduler, schedule: NoiseSchedule, where: str) -> None:
    theirs = scheduler.alphas_cumprod.double()
    if theirs.shape != schedule.alpha_bar.shape or not torch.allclose(
        theirs, schedule.alpha_bar, rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL
    ):
        raise InkwashError(
            f"cannot export {where} to diffusers exactly: its scheduler's alpha_bar differs from inkwash's"
        )


def _prepare_out(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, holds the checkpoint, or is a non-empty folder (without ``overwrite``; with
    it, only a diffusers pipeline folder is replaced)."""
    if out.exists() and not out.is_dir():
        raise InkwashError(f"--diffusers must be a folder, got a file: {out}")
    resolved, source = out.resolve(), checkpoint.resolve()
    if resolved == source or resolved in source.parents:
        raise InkwashError(f"--diffusers {out} would replace the checkpoint it exports ({checkpoint})")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InkwashError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not (out / INDEX_FILE).is_file():
            raise InkwashError(f"{out} is not a diffusers pipeline folder (no {INDEX_FILE}); not replacing it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``; an existing ``out`` is moved aside first and removed last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_diffusers(
    checkpoint_path: str | Path, out: str | Path, *, use_ema: bool = True, overwrite: bool = False
) -> Path:
    """Write the checkpoint (a run folder's newest, or one checkpoint folder) as a ``DDPMPipeline`` folder at
    ``out`` and return ``out``. The folder is built beside ``out`` and renamed into place when complete."""
    checkpoint = resolve_checkpoint(checkpoint_path)
    out = Path(out)
    _prepare_out(out, checkpoint, overwrite)
    try:
        from diffusers import DDPMPipeline, DDPMScheduler
    except ImportError:
        raise InkwashError("exporting to diffusers needs the diffusers package (pip install diffusers)") from None
    model, schedule, config = load_model(checkpoint, use_ema=use_ema)
    where = str(checkpoint)
    unet = diffusers_unet(model, where)
    copy_weights(model, unet)
    unet.eval()
    difference = probe_difference(model, unet, schedule.num_steps)
    if not difference <= PROBE_TOLERANCE:  # also refuses NaN
        raise InkwashError(
            f"cannot export {where} to diffusers exactly: the UNet2DModel's output differs by {difference:.2e} "
            f"(relative; at most {PROBE_TOLERANCE:g} allowed)"
        )
    scheduler = DDPMScheduler(**scheduler_config(schedule, config.get("prediction", "eps"), where))
    _check_schedule(scheduler, schedule, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
