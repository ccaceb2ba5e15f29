"""A DDPM/ADM-style UNet. It maps (x_in, noise_label, class_label) to a tensor shaped like x_in
and knows nothing about the noise schedule or what its output means; see ``denoiser.py``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet (Ho et al. 2020; Dhariwal & Nichol 2021)."""

    image_size: int = 16
    in_channels: int = 1
    out_channels: int | None = None  # defaults to in_channels
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    head_channels: int = 32
    dropout: float = 0.1
    num_groups: int = 32
    num_classes: int = 0  # > 0 adds a class embedding (the extra index num_classes = "no class")
    # Space-to-depth: each patch_size x patch_size block of pixels becomes one position with
    # in_channels * patch_size**2 channels, so the network runs on an (image_size / patch_size) grid;
    # the output is folded back to pixels. attention_resolutions are sizes of that grid.
    patch_size: int = 1
    # > 0 adds an embedding of augmentation labels (non-leaky augmentation, Karras et al. 2022; see
    # data/augment.py); no labels, as at sampling, means "not augmented".
    augment_dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        if self.image_size < 1 or self.in_channels < 1 or self.base_channels < 1:
            raise ValueError("image_size, in_channels and base_channels must be positive")
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"patch size {self.patch_size} must be positive and divide the image size {self.image_size}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.grid_size % factor:
            raise ValueError(
                f"image size {self.image_size} must be divisible by {factor * self.patch_size} "
                f"for {len(self.channel_mult)} resolution levels at patch size {self.patch_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.augment_dim < 0:
            raise ValueError("augment_dim must be 0 (none) or positive")

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def grid_size(self) -> int:
        """Side of the grid the network's first level runs on: image_size / patch_size."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        data["attention_resolutions"] = list(self.attention_resolutions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown UNet config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


PRESETS: dict[str, UNetConfig] = {
    # 1x16x16 digits; small enough to train in minutes on two CPU cores. The images are 8x8 digits
    # upsampled, so the network runs on 2x2 blocks of pixels (an 8x8 grid): about twice the training
    # and sampling speed of the same widths at full resolution, with no loss of quality (docs/experiments.md).
    "digits": UNetConfig(
        image_size=16,
        in_channels=1,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=32,
        dropout=0.1,
        patch_size=2,
    ),
    # 3x32x32 (CIFAR-10 sized), the DDPM CIFAR layout at half width.
    "rgb32": UNetConfig(
        image_size=32,
        in_channels=3,
        base_channels=64,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        head_channels=64,
        dropout=0.1,
    ),
    # A very small network for tests and smoke runs.
    "tiny": UNetConfig(
        image_size=16,
        in_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=16,
        dropout=0.0,
    ),
}


def preset(name: str, **overrides) -> UNetConfig:
    """A named preset, optionally with fields replaced (e.g. ``image_size``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def timestep_embedding(noise_label: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of a (possibly fractional) noise label (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=noise_label.device) / half)
    args = noise_label.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with scale-shift time conditioning (Dhariwal & Nichol 2021, Sec. 3)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over spatial positions, via scaled_dot_product_attention."""

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest_2x(x))


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, (B, C, H, W) -> (B, C, 2H, 2W).

    Eager runs call ``F.interpolate``. Under torch.compile the same values come from a broadcast, whose
    gradient is a sum over each 2x2 block: inductor (CPU, PyTorch 2.13) mis-orders interpolate's backward
    under bf16 autocast, reading the gradient buffer before accumulating into it, so every layer below
    the first upsampling trained on a zero gradient (docs/experiments.md, "--compile trained half a
    network"). The memory layout of ``x`` is kept."""
    if not torch.compiler.is_compiling():
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():  # (B, H, W, C) in memory
        pixels = x.permute(0, 2, 3, 1)[:, :, None, :, None].expand(b, h, 2, w, 2, c)
        return pixels.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class UNet(nn.Module):
    """UNet with skip connections, attention at chosen resolutions and an optional class embedding."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        groups = config.num_groups
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes > 0 else None
        # No bias: all-zero labels ("not augmented") add nothing, so the network samples as if it had none.
        self.augment_emb = nn.Linear(config.augment_dim, emb_dim, bias=False) if config.augment_dim > 0 else None
        patch_area = config.patch_size**2
        self.input_conv = nn.Conv2d(config.in_channels * patch_area, ch, 3, padding=1)

        def block(cin: int, cout: int, res: int) -> nn.ModuleList:
            layers = [ResBlock(cin, cout, emb_dim, config.dropout, groups)]
            if res in config.attention_resolutions:
                layers.append(Attention(cout, config.head_channels, groups))
            return nn.ModuleList(layers)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        res = config.grid_size
        cur = ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(block(cur, ch * mult, res))
                cur = ch * mult
                skip_channels.append(cur)
            if level != len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_channels.append(cur)
                res //= 2

        self.mid_block1 = ResBlock(cur, cur, emb_dim, config.dropout, groups)
        self.mid_attn = Attention(cur, config.head_channels, groups)
        self.mid_block2 = ResBlock(cur, cur, emb_dim, config.dropout, groups)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = block(cur + skip_channels.pop(), ch * mult, res)
                cur = ch * mult
                if level != 0 and i == config.num_res_blocks:
                    layers.append(Upsample(cur))
                    res *= 2
                self.up.append(layers)

        self.out_norm = _group_norm(cur, groups)
        self.out_conv = _zero(nn.Conv2d(cur, config.resolved_out_channels * patch_area, 3, padding=1))

    @staticmethod
    def _run_layers(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        noise_label: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W); noise_label: (B,) float timesteps; class_labels: (B,) ints or None;
        augment_labels: (B, augment_dim) floats from ``data.augment``, or None for un-augmented images."""
        noise_label = noise_label.reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(noise_label, self.config.base_channels))
        if self.class_emb is not None:
            if class_labels is None:  # the "no class" token, as used by classifier-free guidance
                class_labels = torch.full((x.shape[0],), self.config.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(class_labels)
        if augment_labels is not None:
            if self.augment_emb is None:
                raise ValueError("this network was built without augment_dim; it takes no augmentation labels")
            emb = emb + self.augment_emb(augment_labels.to(emb.dtype))
        patch = self.config.patch_size
        if patch > 1:
            x = F.pixel_unshuffle(x, patch)  # (B, C * p * p, H / p, W / p)
        h = self.input_conv(x)  # (B, ch, H / p, W / p)
        skips = [h]
        for layers in self.down:
            h = self._run_layers(layers, h, emb)
            skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for layers in self.up:
            h = self._run_layers(layers, torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, patch) if patch > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
