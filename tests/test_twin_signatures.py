"""`flowmap_jax.X` and `torch_ref.X` twins: the same public names (`__all__`) and the same signatures
(parameter names, kinds and defaults; annotations may name each backend's own types), for functions and for
the public methods of classes. Every deliberate difference is listed below with its reason; anything else
that differs fails.
"""

import importlib
import inspect

import pytest

TWINS = ("schedules", "predictions", "flow_map", "samplers", "objectives", "teacher", "time_pairs",
         "export_loading", "sample", "lora_loading")

# name -> reason, per module: public names only one backend has.
ONLY_JAX = {
    "objectives": {"combine_objectives": "the trainer's mixed loss (fold_in rng streams); the PyTorch reference "
                                         "evaluates one objective at a time for the parity tests"},
    "export_loading": {
        "FlowMapExport": "Flax modules hold no weights: the JAX loader returns the parameters separately ...",
        "jax_flow_map": "... and builds the FlowMap over the Flax UNet port that is called with them"},
    "sample": {"LoadedFlowMap": "bundles the JAX flow map, its device-placed params and the device; PyTorch's "
                                "TorchFlowMapExport already holds all three"},
}
ONLY_TORCH = {
    "flow_map": {"UNetNetwork": "the torch nn.Module wrapping a diffusers UNet (JAX: a closure from unet_network)",
                 "call_network": "calls an nn.Module with or without a params dict (torch.func.functional_call); "
                                 "Flax apply functions always take their params"},
    "teacher": {"tree_map": "jax.tree.map has no torch equivalent for nested dicts of tensors"},
    "time_pairs": {"as_generator": "torch draws from a torch.Generator (or an int seed); JAX takes a PRNG key"},
    "export_loading": {
        "TorchFlowMapExport": "the loaded diffusers UNet with its FlowMap, label table, device and dtype",
        "ExportedUNetNetwork": "runs the diffusers UNet in its own dtype (fp16/bf16) inside a float32 sampler",
        "load_unet": "the stock diffusers UNet of an export, loaded strictly (no Flax counterpart needed)",
        "flow_map_from_unet": "wraps an already-loaded diffusers UNet (a FlowMapPipeline's unet/) and its "
                              "flowmap.json as the export's FlowMap; the diffusers pipeline exists in PyTorch only",
        "DTYPES": "the torch dtypes by name (fp32, fp16, bf16)",
        "torch_dtype": "a torch dtype from its name in DTYPES (the JAX loaders cast with numpy dtypes)"},
    "lora_loading": {
        "lora_flow_map_unet": "the flow-map UNet of a LoRA on an already-loaded diffusers UNet (FlowMapPipeline."
                              "load_flow_map's); JAX merges parameter trees, it has no model object to build",
        "ADAPTER_NAME": "the peft adapter name the LoRA is loaded under (JAX merges the adapters, names none)"},
}
# (module, qualified name) -> reason: signatures that differ on purpose.
SIGNATURE_DIFFERENCES = {
    ("schedules", "batch_times"): "`like`: the tensor whose device the times go to (JAX places arrays itself)",
    ("flow_map", "batch_times"): "re-export of schedules.batch_times (same reason)",
    ("teacher", "gaussian_teacher_fn"): "JAX passes mean and var as the teacher's params (jit arguments); torch "
                                        "closes over them",
    ("teacher", "gaussian_mixture_teacher_fn"): "JAX passes the mixture's weights, means and variances as the "
                                                "teacher's params (jit arguments); torch closes over them",
    ("teacher", "Teacher.create"): "JAX: (apply_fn, params, ...) and weak_apply_fn/weak_params, a pytree whose "
                                   "weights are jit arguments; torch: a model (nn.Module or callable) that holds "
                                   "its weights",
    ("export_loading", "load_flow_map_export"): "torch places the UNet on `device` in `dtype`; JAX returns host "
                                                "numpy params, cast to `dtype` or kept as stored",
    ("lora_loading", "load_lora_flow_map"): "torch places the UNet on `device` in `dtype` and may keep the adapters "
                                            "as peft layers (`fuse`); JAX returns merged float32 host params",
    ("lora_loading", "read_flow_map_inputs"): "torch checks the inputs against the built hooked UNet and the base's "
                                              "state dict; JAX against the hooked config and the base's Flax tree",
}
# (module, class) -> reason: public attributes of twin classes that differ.
CLASS_MEMBER_DIFFERENCES = {
    ("teacher", "Teacher"): "fields follow the create() difference: apply_fn/params/weak_apply_fn/weak_params (and "
                            "flax.struct's replace) in JAX, model/weak_model in torch",
}


def _modules(name):
    package = "flowmap_jax" if name == "sample" else "flowmap_jax.core"  # the sampling command stays at the top
    return importlib.import_module(f"{package}.{name}"), importlib.import_module(f"torch_ref.{name}")


def _signature(obj):
    """(name, kind, default) of each parameter: annotations left out (each backend names its own types)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [(p.name, p.kind, "<no default>" if p.default is inspect.Parameter.empty else repr(p.default))
            for p in sig.parameters.values()]


def _public_methods(cls):
    return {name for name, value in vars(cls).items()
            if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, (classmethod,
                                                                                             staticmethod)))}


def _public_members(cls):
    return {name for name in dir(cls) if not name.startswith("_")} | {
        f.name for f in getattr(cls, "__dataclass_fields__", {}).values() if not f.name.startswith("_")}


@pytest.mark.parametrize("name", TWINS)
def test_twin_modules_export_the_same_names(name):
    jax_module, torch_module = _modules(name)
    assert hasattr(jax_module, "__all__") and hasattr(torch_module, "__all__"), name
    only_jax = set(jax_module.__all__) - set(torch_module.__all__)
    only_torch = set(torch_module.__all__) - set(jax_module.__all__)
    assert only_jax == set(ONLY_JAX.get(name, {})), f"{name}: names only in flowmap_jax: {sorted(only_jax)}"
    assert only_torch == set(ONLY_TORCH.get(name, {})), f"{name}: names only in torch_ref: {sorted(only_torch)}"
    for names, module in ((jax_module.__all__, jax_module), (torch_module.__all__, torch_module)):
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"{module.__name__}.__all__ lists missing names {missing}"


@pytest.mark.parametrize("name", TWINS)
def test_twin_signatures_match(name):
    jax_module, torch_module = _modules(name)
    seen = set()
    for public in sorted(set(jax_module.__all__) & set(torch_module.__all__)):
        a, b = getattr(jax_module, public), getattr(torch_module, public)
        if inspect.isclass(a) and inspect.isclass(b):
            if (name, public) not in CLASS_MEMBER_DIFFERENCES:
                assert _public_members(a) == _public_members(b), f"{name}.{public}: public members differ"
            for method in sorted(_public_methods(a) & _public_methods(b)):
                key = (name, f"{public}.{method}")
                same = _signature(getattr(a, method)) == _signature(getattr(b, method))
                assert same != (key in SIGNATURE_DIFFERENCES), (
                    f"{name}.{public}.{method}: {inspect.signature(getattr(a, method))} vs "
                    f"{inspect.signature(getattr(b, method))}" if not same else f"{key} is listed but now agrees")
                seen.add(key)
        elif callable(a) and callable(b):
            sig_a, sig_b = _signature(a), _signature(b)
            if sig_a is None or sig_b is None:
                continue
            key = (name, public)
            if key in SIGNATURE_DIFFERENCES:
                assert sig_a != sig_b, f"{key} is listed as different but now agrees: drop it from the list"
            else:
                assert sig_a == sig_b, f"{name}.{public}: {inspect.signature(a)} vs {inspect.signature(b)}"
            seen.add(key)
    listed = {key for key in SIGNATURE_DIFFERENCES if key[0] == name}
    assert listed <= seen, f"listed differences for names no longer shared: {sorted(listed - seen)}"


def test_every_listed_difference_has_a_reason():
    for table in (ONLY_JAX, ONLY_TORCH):
        for module, names in table.items():
            assert module in TWINS and all(reason.strip() for reason in names.values())
    assert all(reason.strip() for reason in {**SIGNATURE_DIFFERENCES, **CLASS_MEMBER_DIFFERENCES}.values())
