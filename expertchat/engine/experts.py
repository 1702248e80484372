"""Mixture-of-experts models with one ``nn.Linear`` per expert projection, so that bitsandbytes quantizes the
experts (nf4 ``Linear4bit``) and LoRA can target them (``w1``, ``w2``, ``w3``).

transformers 5 stores Mixtral's experts as two fused 3-D parameters per layer (``experts.gate_up_proj``
``(experts, 2 * intermediate, hidden)`` and ``experts.down_proj``), built at load by the ``"mixtral"`` entry of its
checkpoint conversion mapping (``transformers/conversion_mapping.py``, 5.25). bitsandbytes 0.50 replaces only
``nn.Linear`` modules (bitsandbytes issue #1849), so ``load_in_4bit`` left ~45 B of Mixtral-8x7B's 46.7 B parameters
in 16 bit, and ``target_modules`` found no expert to adapt. :class:`UnfusedMixtralForCausalLM` is transformers' own
Mixtral with :class:`LinearExperts` in place of ``MixtralExperts``: the checkpoint's per-expert
``block_sparse_moe.experts.<e>.w1/w2/w3.weight`` load as they are published (a conversion mapping registered for
these classes through ``register_checkpoint_conversion_mapping`` keeps only the ``block_sparse_moe`` -> ``mlp``
rename; saving writes the published names back). transformers does the same for other MoE models under
quantization (``SequentialMiniCPM5MoeExperts`` in ``transformers/quantizers/base.py``).

Why this route (measured on this machine, CPU, bitsandbytes 0.50.2, one Mixtral-shaped layer of 8 experts, hidden
1024, intermediate 3584, bf16): per-expert ``Linear4bit`` dequantizes one expert projection at a time (7.3 MB,
Mixtral-8x7B: 117 MB); ``bitsandbytes.nn.parametrize.replace_parameter_4bit`` on the fused tensors dequantized the
whole ``gate_up_proj`` of the layer at once (117.4 MB; Mixtral-8x7B: 1.88 GB, 2.8 GB with ``down_proj``), too much
beside a 16 GB V100's weights; pinning transformers 4.57 (per-expert layers, the last v4) would hold the whole
project on an unmaintained major. Un-fused and fused fp32 logits agree exactly (``tests/engine/test_experts.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel

from expertchat.errors import ExpertChatError


class ExpertMLP(nn.Module):
    """One expert: ``w2(act(w1(x)) * w3(x))``, Mixtral's published module (``MixtralBlockSparseTop2MLP`` of
    transformers 4): ``w1`` (gate) and ``w3`` (up) ``hidden -> intermediate``, ``w2`` (down) back, no biases."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class LinearExperts(nn.ModuleList):
    """The experts of one MoE layer as a list of :class:`ExpertMLP`, with transformers 5's experts forward."""

    def __init__(self, config: Any) -> None:
        super().__init__([ExpertMLP(config) for _ in range(config.num_local_experts)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Route each token through its top-k experts and sum their outputs by the router's weights.

        Args:
            hidden_states: ``(tokens, hidden)``.
            top_k_index: ``(tokens, k)`` expert ids (int64) chosen by the router.
            top_k_weights: ``(tokens, k)`` their normalised weights (fp32 from the router's softmax).

        Returns:
            ``(tokens, hidden)`` in ``hidden_states``' dtype; each expert's output is weighted in the expert's
            output dtype and summed in the input's, as ``MixtralExperts.forward`` does.
        """
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            tokens, slots = torch.where(top_k_index == expert)
            routed = self[expert](hidden_states[tokens]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, routed.to(out.dtype))
        return out


class UnfusedMixtralModel(MixtralModel):
    """``MixtralModel`` whose every layer's ``mlp.experts`` is a :class:`LinearExperts`."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        for layer in self.layers:
            layer.mlp.experts = LinearExperts(config)
        self.post_init()


class UnfusedMixtralForCausalLM(MixtralForCausalLM):
    """``MixtralForCausalLM`` on an :class:`UnfusedMixtralModel`; loads and saves published Mixtral checkpoints.

    Its config reports ``model_type`` :data:`UNFUSED_MODEL_TYPE` (``config.json`` still says ``mixtral``:
    ``to_dict`` writes the class's): peft 0.21 rewrites a LoRA config for ``model_type == "mixtral"`` to target the
    fused ``gate_up_proj`` / ``down_proj`` parameters (``peft/utils/transformers_weight_conversion.py``), which this
    model does not have; under this name ``target_modules=[w1, w2, w3]`` reach the per-expert layers."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = UnfusedMixtralModel(config)
        self.post_init()
        self.config.model_type = UNFUSED_MODEL_TYPE


# The class names take priority over the model_type "mixtral" in transformers' lookup (conversion_mapping.py,
# extract_weight_conversions_for_model), so transformers' own MixtralForCausalLM keeps fusing in the same process.
register_checkpoint_conversion_mapping(UnfusedMixtralForCausalLM.__name__,
                                       [WeightRenaming(".block_sparse_moe.", ".mlp.")], overwrite=True)
register_checkpoint_conversion_mapping(UnfusedMixtralModel.__name__, [], overwrite=True)

UNFUSED_MODEL_TYPE = "mixtral_per_expert_linear"
UNFUSED = {"mixtral": UnfusedMixtralForCausalLM}  # model_type -> the class that loads it with nn.Linear experts


def causal_lm_class(model_type: str | None) -> Any:
    """The class that builds and loads a causal LM of ``model_type`` (config.json's field): the un-fused class of
    :data:`UNFUSED` where there is one, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    return UNFUSED.get(model_type or "", AutoModelForCausalLM)


def check_quantized(model: nn.Module, role: str) -> None:
    """After a ``load_in_4bit`` load: no floating parameter with 3 or more dimensions (fused MoE experts, which
    bitsandbytes 0.50 cannot quantize) is left in 16 or 32 bit.

    Raises:
        ExpertChatError: naming the first such parameter, its shape and dtype.
    """
    for name, param in model.named_parameters():
        if param.dim() >= 3 and param.is_floating_point():
            import transformers

            raise ExpertChatError(
                f"{role}.load_in_4bit=true: parameter {name} {tuple(param.shape)} stays {param.dtype} (bitsandbytes "
                f"quantizes only nn.Linear; transformers {transformers.__version__} fuses this model's MoE experts "
                f"into 3-D tensors, bitsandbytes issue #1849): set {role}.load_in_4bit=false, or use a model type "
                f"with per-expert layers here ({', '.join(UNFUSED)})")
