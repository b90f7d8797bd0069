"""LoRA adapters alone, in PEFT's layout: ``adapter_model.safetensors`` and
``adapter_config.json``, as `peft` reads them onto the Hugging Face base model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from itune import atomic, sharding
from itune.convert import weights
from itune.convert.hf import LAYOUTS
from itune.errors import ConfigError
from itune.convert.tokenizer_files import read_json as _read_json
from itune.convert.tokenizer_files import write_json as _write_json
from itune.model import lora
from itune.model.decoder import ModelConfig

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# PEFT's LoRA options that itune's adapters do not have: a value other than these is an error.
_PEFT_PLAIN = dict(
    bias="none",
    fan_in_fan_out=False,
    use_rslora=False,
    use_dora=False,
    layers_to_transform=None,
    rank_pattern={},
    alpha_pattern={},
    modules_to_save=None,
)


def _peft_module(target: str) -> str:
    """``'q'`` -> ``'q_proj'``: the Hugging Face module an itune LoRA target adapts."""
    return LAYOUTS[lora.base_path(target)].name.split(".")[-2]


def _peft_name(target: str, layer: int, which: str) -> str:
    """PEFT's tensor name, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    base = LAYOUTS[lora.base_path(target)].name.format(layer)
    return f"base_model.model.{base.removesuffix('.weight')}.lora_{which}.weight"


def _adapter_target(path: str) -> tuple[str, str]:
    """``'blocks/attn/q_lora_a'`` -> ``('q', 'A')``."""
    target, which = path.rsplit("/", 1)[-1].rsplit("_lora_", 1)
    return target, which.upper()


def save_adapters(
    path: str, cfg: ModelConfig, params: nnx.State, base_model: str | None = None
) -> None:
    """Writes the LoRA adapters of ``params`` alone as PEFT does: ``adapter_model.safetensors``
    (``...q_proj.lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` per layer, in
    ``cfg.param_dtype``) and ``adapter_config.json`` (rank, alpha, dropout, target modules;
    ``base_model`` as ``base_model_name_or_path``). `load_adapters` reads them back.

    Every process must call it (parameters are gathered across processes); process 0 writes.
    """
    import safetensors.numpy  # noqa: PLC0415

    if not cfg.lora_rank:
        raise ValueError("save_adapters: model.lora_rank is 0 (no adapters)")
    _check_no_expert_adapters(cfg)
    tensors = {}
    for name, value in weights.host_params(lora.adapters_only(params)):
        target, which = _adapter_target(name)
        r = cfg.lora_rank
        for layer in range(value.shape[0]):
            one = value[layer]
            hf_value = one.reshape(-1, r).T if which == "A" else one.reshape(r, -1).T
            tensors[_peft_name(target, layer, which)] = np.ascontiguousarray(hf_value)
    if jax.process_index() != 0:
        return
    with atomic.folder(path, merge=True) as out:  # A failure leaves nothing behind.
        safetensors.numpy.save_file(tensors, os.path.join(out, ADAPTER_FILE), {"format": "pt"})
        _write_json(
            os.path.join(out, ADAPTER_CONFIG),
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "r": cfg.lora_rank,
                "lora_alpha": cfg.lora_alpha,
                "lora_dropout": cfg.lora_dropout,
                "target_modules": [_peft_module(t) for t in lora.parse_targets(cfg.lora_targets)],
                "init_lora_weights": True,
                "inference_mode": True,
                **_PEFT_PLAIN,
            },
        )


def adapter_config(path: str, cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the LoRA fields of the adapter folder ``path`` (PEFT's
    ``adapter_config.json``); a PEFT option that itune's LoRA lacks is a ValueError."""
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}")
    peft = _read_json(file)
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type={peft['peft_type']!r}; expected 'LORA'")
    for key, plain in _PEFT_PLAIN.items():
        if peft.get(key) and peft[key] != plain:  # Absent, null or empty: as plain.
            raise ValueError(f"{file}: {key}={peft[key]!r} is not supported (expected {plain!r})")
    modules = peft.get("target_modules")
    modules = [modules] if isinstance(modules, str) else list(modules or [])
    by_module = {_peft_module(t): t for t in lora.TARGETS}
    unknown = [m for m in modules if m not in by_module]
    if unknown or not modules:
        raise ValueError(
            f"{file}: target_modules={peft.get('target_modules')!r}; expected names among "
            f"{sorted(by_module)}"
        )
    targets = [t for t in lora.TARGETS if _peft_module(t) in modules]
    return dataclasses.replace(
        cfg,
        lora_rank=int(peft["r"]),
        lora_alpha=float(peft.get("lora_alpha", 8)),  # PEFT's default alpha.
        lora_dropout=float(peft.get("lora_dropout") or 0.0),
        lora_targets=",".join(targets),
    )


def _check_no_expert_adapters(cfg: ModelConfig) -> None:
    """PEFT names an expert's adapters after transformers' module of that expert, which
    transformers 5 fuses across experts: adapters on experts travel merged (`hf.save_hf`)."""
    experts = [t for t in lora.parse_targets(cfg.lora_targets) if lora.experts_of(cfg, t)]
    if cfg.lora_rank and experts:
        raise ConfigError(
            f"model.lora_targets has expert projections {experts}: PEFT adapters of experts "
            "are not written or read; export the merged model (--to=hf) instead"
        )


def load_adapters(
    path: str,
    cfg: ModelConfig,
    mesh=None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
) -> tuple[ModelConfig, nnx.State]:
    """``(cfg with the adapters' LoRA fields, adapters)`` from a folder written by
    `save_adapters` (or by PEFT, for itune's targets), placed on ``mesh`` (the first device
    without one) in ``cfg.param_dtype``. ``lora.with_adapters(base_params, adapters)`` makes
    the LoRA model's parameters. A missing, misshapen or unexpected tensor is a ValueError."""
    cfg = adapter_config(path, cfg)
    _check_no_expert_adapters(cfg)
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, abstract = weights.abstract_params(cfg, rules)
    abstract = lora.adapters_only(abstract)
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh, rules)))
    file = os.path.join(path, ADAPTER_FILE)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    placed, used = [], set()
    with safe_open(file, framework="numpy") as f:
        names = set(f.keys())
        for key, variable in nnx.to_flat_state(abstract):
            target, which = _adapter_target("/".join(map(str, key)))
            shape = tuple(variable.shape)
            layers = []
            for layer in range(shape[0]):
                name = _peft_name(target, layer, which)
                hf_shape = (
                    (shape[-1], math.prod(shape[1:-1]))
                    if which == "A"
                    else (math.prod(shape[2:]), shape[1])
                )
                if name not in names:
                    raise ValueError(f"{file}: tensor {name} {hf_shape} is missing")
                value = f.get_tensor(name)
                if tuple(value.shape) != hf_shape:
                    raise ValueError(
                        f"{file}: tensor {name} has shape {tuple(value.shape)}, expected {hf_shape}"
                    )
                layers.append(value.T.reshape(shape[1:]))
                used.add(name)
            full = np.stack(layers).astype(dtype)
            array = jax.make_array_from_callback(
                shape, shardings[key].get_value(), lambda index, full=full: full[index]
            )
            placed.append((key, variable.replace(array)))
    unexpected = sorted(names - used)
    if unexpected:
        raise ValueError(f"{file}: unexpected tensors {unexpected[:8]}")
    return cfg, nnx.from_flat_state(placed)
