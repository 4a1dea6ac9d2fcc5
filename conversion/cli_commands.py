"""The subcommands of `python -m conversion`, one small class each (name, help, arguments, run)."""

from __future__ import annotations

import os
import time

import numpy as np


class ToFlax:
    name = "to-flax"
    help = "diffusers UNet (folder or hub id) -> Flax params folder"

    @classmethod
    def add_parser(cls, sub):
        p = sub.add_parser(cls.name, help=cls.help, description=cls.help)
        p.add_argument("source", help="diffusers UNet folder, pipeline folder (with --subfolder) or hub id")
        p.add_argument("out", help="output folder: config.json + flax_params.safetensors (new, empty, or a "
                                   "previous to-flax output, which is replaced atomically)")
        p.add_argument("--subfolder", default=None, help="e.g. 'unet' for a pipeline folder")
        p.add_argument("--variant", default=None, help="weights variant, e.g. 'fp16'")
        p.add_argument("--dtype", default="float32", choices=["float32", "keep"],
                       help="cast weights to float32 (default) or keep the stored dtype")
        p.add_argument("--allow-torch-bin", action="store_true",
                       help="read legacy .bin weights with torch.load(weights_only=True)")
        p.set_defaults(run=cls.run)

    @staticmethod
    def run(args):
        from conversion.flax_io import FLAX_PARAMS_NAME, save_flax_params
        from conversion.output_folder import (
            check_output_folder,
            write_folder_atomically,
        )
        from flowmap_jax.unet.diffusers_io import CONFIG_NAME, load_diffusers_unet

        start = time.perf_counter()
        own = (CONFIG_NAME, FLAX_PARAMS_NAME)
        check_output_folder(args.out, own, "to-flax")  # before the (long) load
        config, params = load_diffusers_unet(args.source, args.subfolder, args.variant,
                                             dtype=None if args.dtype == "keep" else np.float32,
                                             allow_torch_bin=args.allow_torch_bin)
        out = write_folder_atomically(args.out, lambda tmp: save_flax_params(params, config, tmp), own, "to-flax")
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s")


class ToDiffusers:
    name = "to-diffusers"
    help = "Flax params folder -> diffusers UNet folder (safetensors) that from_pretrained loads"

    @classmethod
    def add_parser(cls, sub):
        p = sub.add_parser(cls.name, help=cls.help, description=cls.help)
        p.add_argument("source", help="folder with config.json + flax_params.safetensors")
        p.add_argument("out", help="output diffusers UNet folder (new, empty, or a previous to-diffusers output, "
                                   "which is replaced atomically)")
        p.set_defaults(run=cls.run)

    @staticmethod
    def run(args):
        from conversion.flax_io import load_flax_params
        from conversion.output_folder import (
            check_output_folder,
            write_folder_atomically,
        )
        from flowmap_jax.unet.diffusers_io import (
            CONFIG_NAME,
            WEIGHTS_NAME,
            save_diffusers_unet,
        )

        own = (CONFIG_NAME, f"{WEIGHTS_NAME}.safetensors")
        check_output_folder(args.out, own, "to-diffusers")
        config, params = load_flax_params(args.source)
        out = write_folder_atomically(args.out, lambda tmp: save_diffusers_unet(params, config, tmp), own,
                                      "to-diffusers")
        print(f"wrote {out}")


COMMANDS = [ToFlax, ToDiffusers]


class Export:
    name = "export"
    help = ("training run / Orbax checkpoint (EMA weights by default) -> flow-map diffusers folder "
            "(UNet2DConditionModel + flowmap.json)")

    @classmethod
    def add_parser(cls, sub):
        p = sub.add_parser(cls.name, help=cls.help, description=cls.help + ". See flowmap_jax/training/export_writer.py.")
        p.add_argument("source", help="run folder, its checkpoints/ folder, one step's folder "
                                      "(run/checkpoints/400), or an existing flow-map export (re-export)")
        p.add_argument("out", help="output folder (replaced atomically if it is a previous export)")
        p.add_argument("--weights", default="ema", choices=["ema", "params"],
                       help="EMA weights (default) or the raw trained parameters")
        p.add_argument("--step", type=int, default=None,
                       help="checkpoint step (default: the newest readable one)")
        p.add_argument("--teacher", default=None,
                       help="teacher folder or hub id (default: the run config's teacher.path)")
        p.add_argument("--run-config", default=None,
                       help="the run's config.json (default: next to the checkpoints folder)")
        p.add_argument("--pipeline", nargs="?", const="", default=None, metavar="TEACHER_PIPELINE",
                       help="write a full diffusers pipeline folder (FlowMapPipeline: the flow map as unet/, the "
                            "teacher pipeline's vae, text encoder(s), tokenizer(s), scheduler); the teacher "
                            "pipeline defaults to the run's teacher.path (conversion/pipeline_export.py)")
        form = p.add_mutually_exclusive_group()
        form.add_argument("--lora", action="store_true",
                          help="a LoRA run: its adapters in diffusers' LoRA format (pytorch_lora_weights.safetensors), "
                               "the flow map's inputs and flowmap.json (the default for a LoRA run; an error for a "
                               "full fine-tune); see flowmap_jax/spec/lora_format.py")
        form.add_argument("--merge", action="store_true",
                          help="a LoRA run: the adapters merged into the base UNet, a full export like a full "
                               "fine-tune's")
        p.add_argument("--lora-dtype", default="float32", choices=["float32", "float16"],
                       help="dtype of the adapters in pytorch_lora_weights.safetensors (default float32)")
        p.set_defaults(run=cls.run)

    @staticmethod
    def run(args):
        import tempfile

        from flowmap_jax.training.export_command import export_checkpoint

        start = time.perf_counter()
        form = "lora" if args.lora else "merge" if args.merge else "auto"
        if args.pipeline is None:
            folder = export_checkpoint(args.source, args.out, weights=args.weights, step=args.step,
                                       teacher=args.teacher, run_config=args.run_config, form=form,
                                       lora_dtype=args.lora_dtype)
        else:
            from conversion.pipeline_export import teacher_pipeline_of, write_pipeline

            if args.lora:
                raise ValueError("--pipeline writes a full UNet: use --merge (or no flag) with it, not --lora; a LoRA "
                                 "folder loads onto a stock pipeline with FlowMapPipeline.load_flow_map")
            with tempfile.TemporaryDirectory() as tmp:
                # A LoRA run's pipeline holds the adapters merged into the base.
                unet = export_checkpoint(args.source, os.path.join(tmp, "unet"), weights=args.weights,
                                         step=args.step, teacher=args.teacher, run_config=args.run_config,
                                         form="unet")
                teacher = args.pipeline or teacher_pipeline_of(unet, args.teacher)
                folder = write_pipeline(unet, teacher, args.out)
        print(f"wrote {folder} in {time.perf_counter() - start:.1f}s")


COMMANDS.append(Export)
