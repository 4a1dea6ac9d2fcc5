"""Test set-up, applied before jax is imported: 8 simulated CPU devices, single-threaded XLA and
torch kernels (pytest -n 2 already fills both cores; nested thread pools only oversubscribe them),
and highest matmul precision for parity."""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the JAX-only tests run without torch
    pass


# --------------------------------------------------------------------------------------------------
# Tiny Stable Diffusion pipeline folders (tests/sd_pipelines.py), written once per session.

import pytest


@pytest.fixture(scope="session")
def sd15_pipeline(tmp_path_factory):
    """Folder of a tiny SD 1.x diffusers pipeline (32 px images, 8x8x4 latents, CLIP text dim 16)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.sd_pipelines import write_sd15_pipeline

    return write_sd15_pipeline(tmp_path_factory.mktemp("sd15_pipeline"))


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
    """Folder of a tiny SDXL diffusers pipeline (two text encoders, text_time added conditioning)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.sd_pipelines import write_sdxl_pipeline

    return write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl_pipeline"))


@pytest.fixture(scope="session")
def sd15_flow_pipeline(tmp_path_factory, sd15_pipeline):
    """A FlowMapPipeline folder (`conversion.pipeline_export.write_pipeline`) of an untrained "teacher_step" flow
    map on the tiny SD 1.x pipeline: its jumps are the teacher's DDIM steps."""
    from conversion.pipeline_export import write_pipeline
    from tests.sd_pipelines import export_untrained_flow_map

    tmp = tmp_path_factory.mktemp("sd15_flow")
    unet = export_untrained_flow_map(sd15_pipeline, tmp / "unet")
    return write_pipeline(unet, str(sd15_pipeline), tmp / "pipeline")


@pytest.fixture(scope="session")
def sdxl_flow_pipeline(tmp_path_factory, sdxl_pipeline):
    """The same on the tiny SDXL pipeline."""
    from conversion.pipeline_export import write_pipeline
    from tests.sd_pipelines import export_untrained_flow_map

    tmp = tmp_path_factory.mktemp("sdxl_flow")
    unet = export_untrained_flow_map(sdxl_pipeline, tmp / "unet")
    return write_pipeline(unet, str(sdxl_pipeline), tmp / "pipeline")
