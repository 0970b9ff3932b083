"""NF4 4-bit storage for fused MoE expert weights (Qwen3-MoE in transformers 5).

transformers' bitsandbytes integration quantizes nn.Linear only. Qwen3-MoE keeps
its experts as two 3-D nn.Parameters on one module (`gate_up_proj` (E, 2I, H),
`down_proj` (E, H, I)), about 95% of the weights, so a `load_in_4bit` load leaves
them bf16 and `prepare_model_for_kbit_training` then casts them to float32.

`quantize_fused_experts` packs each with bitsandbytes NF4 (double quant,
blocksize 64). The module keeps only the packed uint8 bytes, still registered
under the same parameter name (so `named_parameters`, `.to(device)`, PEFT's
`target_parameters` matching and `prepare_model_for_kbit_training`, which
skips non-float tensors, all see it), and its class gains a property of that
name which returns the weight dequantized in the compute dtype. The experts
forward itself is unchanged (eager loop, grouped_mm or Unsloth's backend).
(Not a torch parametrization: PEFT 0.21 matches `target_parameters` such as
"mlp.experts.gate_up_proj" only by full name on parametrized modules, and
stacking its own per-forward parametrization on ours leaks its proxy.)

PEFT's `target_parameters` LoRA (`ParamWrapper`) adds its delta by registering
a torch parametrization on the parameter for each forward and removing it
after; on packed storage that would swap the bytes for a dense copy. So for
the parameters quantized here `ParamWrapper._activate_lora` only hands the
LoRA factors to our dequantization, which folds them in with the `baddbmm`
PEFT uses; and `ParamWrapper.merge` stores the merged weight dense, since
requantizing would bury the update in NF4 noise.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from finetune.lora import category

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64
# stored bytes per expert weight: 4-bit codes and, with compressed statistics, a byte of absmax per block
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / BLOCKSIZE


class NF4State:
    """How to turn one packed expert tensor back into its dense weight."""

    def __init__(self, quant_state, shape: torch.Size, compute_dtype: torch.dtype):
        quant_state.dtype = compute_dtype  # dequantize_4bit writes this dtype directly
        self.quant_state = quant_state
        self.shape = shape
        self.lora = None  # (ParamWrapper, adapter names) while a PEFT forward is active

    def dequantize(self, packed: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        if self.quant_state.absmax.device != packed.device:  # model.to(device) moved only the bytes
            self.quant_state.to(packed.device)
        weight = bnbf.dequantize_4bit(packed, self.quant_state).view(self.shape)
        if self.lora is not None:
            wrapper, adapters = self.lora
            for adapter in adapters:
                weight = _add_lora(weight, wrapper, adapter)
        return weight


def _add_lora(weight: torch.Tensor, wrapper, adapter: str) -> torch.Tensor:
    """weight + scaling * B @ A per expert: PEFT's `get_delta_factors`, without its `get_param()`
    (a second dequantization)."""
    experts = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    a = a.reshape(experts, -1, a.shape[-1])  # (E, r, in): grouped by expert
    b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r): expert index is fastest
    lhs, rhs = (b, a) if wrapper._did_swap_in_out_features else (a.mT, b.mT)
    return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=wrapper.scaling[adapter])


def _nf4(module: nn.Module, name: str) -> NF4State | None:
    return module.__dict__.get("_nf4_states", {}).get(name)


def _weight_property(name: str) -> property:
    def get(self):
        state = _nf4(self, name)
        if state is None:  # merged back to dense
            return self._parameters[name]
        cache = self.__dict__.get("_nf4_cache")
        if cache is None:
            return state.dequantize(self._parameters[name])
        if name not in cache:
            cache[name] = state.dequantize(self._parameters[name])
        return cache[name]

    return property(get)


_NF4_CLASSES: dict = {}


def _nf4_class(cls: type, compute_dtype: torch.dtype) -> type:
    """Subclass of an experts class whose weights read through `_weight_property`."""
    if cls in _NF4_CLASSES.values():  # re-quantizing a module merged back to dense
        return cls
    key = (cls, compute_dtype)
    if key not in _NF4_CLASSES:

        def forward(self, hidden_states, *args, **kwargs):
            # Dequantize each weight once per call (the eager loop indexes it per expert), and run in
            # the compute dtype like bnb's Linear4bit: prepare_model_for_kbit_training makes the
            # residual stream float32.
            self.__dict__["_nf4_cache"] = {}
            try:
                out = super(new_cls, self).forward(hidden_states.to(compute_dtype), *args, **kwargs)
            finally:
                del self.__dict__["_nf4_cache"]
            return out.to(hidden_states.dtype)

        attrs = {name: _weight_property(name) for name in EXPERT_PARAMS}
        new_cls = type(f"NF4{cls.__name__}", (cls,), {"forward": forward, **attrs})
        _NF4_CLASSES[key] = new_cls
    return _NF4_CLASSES[key]


def quantize_fused_experts(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every fused 3-D expert `gate_up_proj` / `down_proj` as NF4; return how many were quantized.

    Skips tensors already 4-bit (quantized here before, or bnb Params4bit, e.g. by Unsloth on CUDA).
    Call after loading and before `prepare_model_for_kbit_training` / `get_peft_model`.
    """
    import bitsandbytes.functional as bnbf

    _patch_peft_param_wrapper()
    count = 0
    for module in list(model.modules()):
        params = [module._parameters.get(name) for name in EXPERT_PARAMS]
        if any(p is None or p.ndim != 3 or not p.is_floating_point() for p in params):
            continue  # not fused experts, or already 4-bit: ours and Params4bit both store packed uint8
        states = module.__dict__.setdefault("_nf4_states", {})
        for name, param in zip(EXPERT_PARAMS, params):
            # Flat 1-D: bitsandbytes 0.50.2's CPU dequantize kernel can misread the block scales when
            # the last dim is not a multiple of the blocksize (e.g. 96); a flat tensor is read right.
            packed, quant_state = bnbf.quantize_4bit(
                param.detach().reshape(-1), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            states[name] = NF4State(quant_state, param.shape, compute_dtype)
            module._parameters[name] = nn.Parameter(packed, requires_grad=False)  # frees the dense tensor
            count += 1
        del params, param  # drop the last references to the dense tensors before the next module
        module.__class__ = _nf4_class(type(module), compute_dtype)
    return count


def _patch_peft_param_wrapper() -> None:
    """Route PEFT's ParamWrapper LoRA for our NF4 parameters through NF4State (see module doc)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
        from peft.tuners.tuners_utils import check_adapters_to_merge
    except ImportError:
        return
    if getattr(ParamWrapper, "_nf4_experts_patched", False):
        return
    activate, merge = ParamWrapper._activate_lora, ParamWrapper.merge

    @contextmanager
    def _activate_lora(self, active_adapters):
        state = _nf4(self.get_base_layer(), self.parameter_name)
        if state is None:
            with activate(self, active_adapters):
                yield
            return
        state.lora = (self, [a for a in active_adapters if a in self.lora_A])
        try:
            yield
        finally:
            state.lora = None

    def _merge(self, safe_merge: bool = False, adapter_names=None):
        base, name = self.get_base_layer(), self.parameter_name
        if _nf4(base, name) is None:
            return merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        with torch.no_grad():
            weight = getattr(base, name)
            for adapter in adapter_names:
                weight = _add_lora(weight, self, adapter)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights of {name}")
        # The merged weight is stored dense (compute dtype): this tensor leaves 4-bit here.
        del base._nf4_states[name]
        base._parameters[name] = nn.Parameter(weight, requires_grad=False)
        self.merged_adapters.extend(adapter_names)

    ParamWrapper._activate_lora = _activate_lora
    ParamWrapper.merge = _merge
    ParamWrapper._nf4_experts_patched = True


# --- storage report ---------------------------------------------------------------------------

def _scale_bytes(quant_state) -> int:
    """Bytes of a bnb QuantState's block scales (absmax, plus the nested ones under double quant)."""
    n = quant_state.absmax.numel() * quant_state.absmax.element_size()
    if getattr(quant_state, "state2", None) is not None:
        n += quant_state.state2.absmax.numel() * quant_state.state2.absmax.element_size()
    return n


def storage_by_category(model: nn.Module) -> dict[str, dict[str, int]]:
    """{category: {storage kind: bytes}} over parameters; kind is "4bit" (bnb Params4bit or our NF4:
    packed bytes plus block scales) or the dtype name."""
    states = {}  # id(packed parameter) -> QuantState of our NF4 experts
    for module in model.modules():
        for name, state in module.__dict__.get("_nf4_states", {}).items():
            states[id(module._parameters[name])] = state.quant_state
    out: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        state = states.get(id(param))
        if state is None and type(param).__name__ == "Params4bit":
            state = getattr(param, "quant_state", None)
        kind = "4bit" if state is not None else str(param.dtype).removeprefix("torch.")
        size = param.numel() * param.element_size() + (_scale_bytes(state) if state is not None else 0)
        bucket = out.setdefault("lora" if "lora_" in name else category(name), {})
        bucket[kind] = bucket.get(kind, 0) + size
    return out


def describe_storage(storage: dict[str, dict[str, int]]) -> str:
    """One line: what each part of the model is stored as, e.g. "experts 4bit 1.5 MiB; attention ..."."""
    def size(n: float) -> str:
        return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"

    return "; ".join(f"{cat} " + " + ".join(f"{kind} {size(n)}" for kind, n in kinds.items())
                     for cat, kinds in storage.items() if cat != "lora")
