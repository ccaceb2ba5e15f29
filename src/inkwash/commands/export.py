"""``inkwash export``: write a run's checkpoint as a diffusers ``DDPMPipeline`` folder
(``inkwash.interop.export``)."""

from __future__ import annotations

from dataclasses import dataclass

from inkwash.options import check_options, option


@dataclass(kw_only=True)
class ExportOptions:
    checkpoint: str = option(help="run directory (its newest checkpoint) or one checkpoint folder")
    diffusers: str = option(help="the DDPMPipeline folder to write", metavar="OUT")
    use_ema: bool = option(True, "export the raw weights instead of the EMA", flag="--no-ema")
    overwrite: bool = option(False, "replace an existing diffusers pipeline folder at OUT")

    def validate(self) -> None:
        check_options(self)


def cmd_export(options: ExportOptions) -> None:
    from inkwash.interop.export import export_diffusers

    out = export_diffusers(options.checkpoint, options.diffusers, use_ema=options.use_ema, overwrite=options.overwrite)
    weights = "EMA" if options.use_ema else "raw"
    print(f"wrote {out} ({weights} weights): load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
