"""A PyTorch-native Llama, in the style of facebookresearch/llama ``model.py``, and the seed's walk-through.

The native model knows nothing of Hugging Face: ``Transformer(params)`` has ``tok_embeddings``, ``layers``,
``norm``, ``output`` and ``freqs_cis``; ``forward(tokens, start_pos)`` returns logits and keeps its own KV cache
per layer, indexed by ``start_pos`` (the reference's inference cache). Small departures from the reference: the
cache stores detached keys/values and the current step's keys/values are concatenated to it, so the same forward
trains (``start_pos=0``); an optional transformers ``Cache`` (``past_key_values``) can replace the internal cache;
and ``decoder_forward`` optionally takes a padding mask and per-sequence positions (left-padded batches).

The walk-through at the bottom (``LlamaDecoder``, ``Llama``, ``LlamaForCausalLM``) is the seed's, as written.
Run ``python examples/native_llama.py`` to generate with a ``text-generation`` pipeline from a tiny random model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from hfbridge.adapters import HFDecoder, HFDecoderModelArchitecture, LMHeadModelLMHeadMixin


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # not in the reference: the exact FFN width (HF's intermediate_size)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ndim = x.ndim
    if freqs_cis.ndim == 3:  # not in the reference: one row of positions per sequence (left padding)
        assert freqs_cis.shape[0] in (1, x.shape[0]) and freqs_cis.shape[1:] == (x.shape[1], x.shape[-1])
        return freqs_cis[:, :, None, :]
    assert freqs_cis.shape == (x.shape[1], x.shape[-1])
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep)"""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_local_heads = args.n_heads
        self.n_local_kv_heads = self.n_kv_heads
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads

        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

        cache_shape = (args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)

    def forward(self, x, start_pos: int, freqs_cis, mask, past_key_values=None):
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)

        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)

        if past_key_values is not None:  # a transformers Cache: (batch, heads, seq, head_dim)
            keys, values = past_key_values.update(xk.transpose(1, 2), xv.transpose(1, 2), self.layer_id)
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        else:  # the reference's own cache, indexed by start_pos
            if bsz > self.cache_k.shape[0] or start_pos + seqlen > self.cache_k.shape[1]:
                raise ValueError(f"batch {bsz} x length {start_pos + seqlen} exceeds the KV cache {tuple(self.cache_k.shape[:2])}")
            self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk.detach().to(self.cache_k)
            self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv.detach().to(self.cache_v)
            keys = torch.cat([self.cache_k[:bsz, :start_pos].to(xk), xk], dim=1)
            values = torch.cat([self.cache_v[:bsz, :start_pos].to(xv), xv], dim=1)

        keys = repeat_kv(keys, self.n_rep)  # (bs, cache_len + seqlen, n_local_heads, head_dim)
        values = repeat_kv(values, self.n_rep)

        xq = xq.transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
        keys = keys.transpose(1, 2)
        values = values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask  # (bs, n_local_heads, seqlen, cache_len + seqlen)
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)  # (bs, n_local_heads, seqlen, head_dim)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None, exact: int | None = None):
        super().__init__()
        if exact is not None:
            hidden_dim = exact
        else:
            hidden_dim = int(2 * hidden_dim / 3)
            if ffn_dim_multiplier is not None:
                hidden_dim = int(ffn_dim_multiplier * hidden_dim)
            hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(
            dim=args.dim, hidden_dim=4 * args.dim, multiple_of=args.multiple_of,
            ffn_dim_multiplier=args.ffn_dim_multiplier, exact=args.ffn_hidden_dim,
        )
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos: int, freqs_cis, mask, past_key_values=None):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, past_key_values)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # Like the reference, a plain attribute (moved to the input's device on use), never saved.
        self.freqs_cis = precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, past_key_values=None) -> torch.Tensor:
        h = decoder_forward(self, tokens, start_pos, past_key_values)
        return self.output(h).float()


def decoder_forward(model: Transformer, tokens: torch.Tensor, start_pos: int = 0, past_key_values=None,
                    padding_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The native transformer without its output layer: the normed hidden states, (batch, seq, dim).

    Not in the reference: ``padding_mask`` (batch, start_pos + seq; 1 = attend, 0 = padding) hides padded keys, and
    ``positions`` (batch, seq) rotates each sequence from its own positions -- together, left-padded batches.
    """
    _bsz, seqlen = tokens.shape
    h = model.tok_embeddings(tokens)
    model.freqs_cis = model.freqs_cis.to(h.device)
    freqs_cis = model.freqs_cis[start_pos : start_pos + seqlen] if positions is None else model.freqs_cis[positions]

    mask = None
    if seqlen > 1:
        mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
        mask = torch.triu(mask, diagonal=1)
        # When performing key-value caching, we compute the attention scores only for the new sequence.
        mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask]).type_as(h)
    if padding_mask is not None:  # the lowest finite value: a query that sees only padding stays finite
        padding = torch.zeros(padding_mask.shape, dtype=h.dtype, device=h.device)
        padding = padding.masked_fill(padding_mask.to(h.device) == 0, torch.finfo(h.dtype).min)[:, None, None, :]
        mask = padding if mask is None else mask + padding

    for layer in model.layers:
        h = layer(h, start_pos, freqs_cis, mask, past_key_values)
    return model.norm(h)


# ------------------------------------------------------------------------------------ weights from/to HF Llama
def model_args_from_config(config: LlamaConfig, max_batch_size: int = 8, max_seq_len: int | None = None) -> ModelArgs:
    """The native ``ModelArgs`` matching a transformers ``LlamaConfig``."""
    rope = getattr(config, "rope_parameters", None) or {}
    return ModelArgs(
        dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads, vocab_size=config.vocab_size, ffn_hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps, rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        max_batch_size=max_batch_size, max_seq_len=max_seq_len or config.max_position_embeddings,
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half q/k layout back to Meta's interleaved-pair layout (inverse of convert_llama_weights_to_hf)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def load_hf_llama_weights(model: Transformer, hf_model: nn.Module) -> Transformer:
    """Copy the weights of a transformers ``LlamaForCausalLM`` into the native ``Transformer``."""
    sd = hf_model.state_dict()
    n_heads, n_kv = model.params.n_heads, model.params.n_kv_heads or model.params.n_heads
    new = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    new["output.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(model.params.n_layers):
        p = f"model.layers.{i}."
        new[f"layers.{i}.attention.wq.weight"] = _unpermute(sd[p + "self_attn.q_proj.weight"], n_heads)
        new[f"layers.{i}.attention.wk.weight"] = _unpermute(sd[p + "self_attn.k_proj.weight"], n_kv)
        new[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        new[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        new[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        new[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        new[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        new[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        new[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    model.load_state_dict(new, strict=True)
    return model


# ------------------------------------------------------------------------------------ the seed's walk-through
class LlamaDecoder(HFDecoder):
    def __init__(self, model: nn.Module, config: LlamaConfig):
        super().__init__(model, config)

    def _adapt(self, input_ids=None, start_pos: int = 0, *args, **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
        output = decoder_forward(self.model, input_ids, start_pos)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=output)


class Llama(HFDecoderModelArchitecture):
    config_class = LlamaConfig
    base_model_prefix = "llama"

    def __init__(self, config: LlamaConfig, model: Transformer, *args, **kwargs):
        super().__init__(LlamaDecoder(model, config), model.tok_embeddings, config, *args, **kwargs)


class LlamaForCausalLM(LMHeadModelLMHeadMixin, Llama):
    def __init__(self, model: Transformer, config: LlamaConfig, *args, **kwargs):
        super().__init__(model=model, config=config, bias=False, lm_head=model.output, *args, **kwargs)  # noqa: B026 (as in the seed)


class ReorderingLlamaDecoder(LlamaDecoder):
    """The walk-through's decoder plus the optional hook that reorders the native cache for beam search (without
    it, the step after a reordering recomputes the whole sequence)."""

    def reorder_cache(self, beam_idx: torch.Tensor) -> bool:
        n = beam_idx.shape[0]
        for layer in self.model.layers:
            for cache in (layer.attention.cache_k, layer.attention.cache_v):
                cache[:n] = cache[:n].index_select(0, beam_idx.to(cache.device))
        return True


# ------------------------------------------------------------------------------------ transformers' cache variant
class LlamaDecoderWithHFCache(HFDecoder):
    """The same native model, handed transformers' ``Cache`` objects (``DynamicCache``) instead of its own cache."""

    def _adapt(self, input_ids=None, past_key_values=None, *args, **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
        start_pos = past_key_values.get_seq_length() if past_key_values is not None else 0
        output = decoder_forward(self.model, input_ids, start_pos, past_key_values)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=output, past_key_values=past_key_values)


class LlamaWithHFCacheForCausalLM(LMHeadModelLMHeadMixin, HFDecoderModelArchitecture):
    config_class = LlamaConfig
    base_model_prefix = "llama"

    def __init__(self, model: Transformer, config: LlamaConfig, **kwargs):
        super().__init__(LlamaDecoderWithHFCache(model, config), model.tok_embeddings, config, lm_head=model.output, **kwargs)


# ------------------------------------------------------------------------------------ registrable with Auto classes
class NativeLlamaConfig(LlamaConfig):
    """A ``LlamaConfig`` under its own ``model_type``, so the Auto classes map it to the wrapped native model."""

    model_type = "native_llama"


class NativeLlamaForCausalLM(LlamaForCausalLM):
    """The walk-through's ``LlamaForCausalLM``, built from its config alone (what ``from_pretrained`` needs)."""

    config_class = NativeLlamaConfig

    def __init__(self, config: NativeLlamaConfig, model: Transformer | None = None, **kwargs):
        super().__init__(model=model if model is not None else Transformer(model_args_from_config(config)), config=config, **kwargs)


def register_auto_classes() -> None:
    """Register ``native_llama`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(NativeLlamaConfig.model_type, NativeLlamaConfig)
        AutoModelForCausalLM.register(NativeLlamaConfig, NativeLlamaForCausalLM)
    except ValueError:  # already registered
        pass


if __name__ == "__main__":
    from transformers import pipeline

    from hfbridge.testing import build_tiny_tokenizer, tiny_llama_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    transformer = Transformer(model_args_from_config(config))

    hf_model = LlamaForCausalLM(model=transformer, config=config)
    generator_hf = pipeline(task="text-generation", model=hf_model, tokenizer=tokenizer, max_new_tokens=50, device="cpu")
    print(generator_hf("The quick brown fox", do_sample=False)[0]["generated_text"])
