"""ModernBERT (mmBERT) encoder with its masked-language-model head, in one file.

References: ModernBERT (arXiv 2412.13663), mmBERT (2509.06888). Matches transformers'
`models/modernbert/modeling_modernbert.py` (`ModernBertForMaskedLM`), logits to 1e-4.

Module and parameter names equal the keys of a transformers `ModernBertForMaskedLM`
checkpoint (`model.layers.3.attn.Wqkv.weight`, `head.dense.weight`, `decoder.bias`, ...), so a
checkpoint loads with a plain `load_state_dict` and no renaming table.

Forward pass (ModernBERT 2412.13663; as transformers' modeling_modernbert):
    x = LayerNorm(E[ids])
    for each layer l:   x = x + Wo(attn(rope(attn_norm(x))))      (layer 0: no attn_norm)
                        x = x + Wo_mlp(gelu(u) * g),  [u, g] = Wi(mlp_norm(x))
    h = final_norm(x);  logits = decoder(head.norm(gelu(head.dense(h))))
Layer l is global when l % global_attn_every_n_layers == 0, else local: query i sees key j
only when |i - j| <= local_attention // 2. Saving: minidiff/plumbing/checkpoint.py; faster CPU
products for a model only read: minidiff/speed/packed.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


@dataclass
class ModelConfig:
    """The architecture, with transformers' `ModernBertConfig` field names and defaults.

    Build it from a `config.json` with `from_dict`/`from_json`: every field the model uses is
    read from the file; unknown keys are ignored. Both config layouts are understood: the
    transformers 4.x one (`global_rope_theta`, `local_rope_theta`,
    `global_attn_every_n_layers`) and the 5.x one (`rope_parameters`, `layer_types`).
    """

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    max_position_embeddings: int = 8192
    global_rope_theta: float = 160000.0
    local_rope_theta: float | None = None  # absent from config.json: 10000, as transformers
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    layer_types: list[str] | None = None  # "full_attention" | "sliding_attention" per layer
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False
    decoder_bias: bool = True
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    pad_token_id: int | None = 50283
    eos_token_id: int | None = 50282
    bos_token_id: int | None = 50281
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    mask_token_id: int | None = None  # not a transformers field; recorded when known

    def __post_init__(self) -> None:
        if self.local_rope_theta is None:
            # transformers (4.x and 5.x) falls back to 10000 here, not to the global theta, so a
            # checkpoint trained with a config lacking the field was trained with 10000.
            self.local_rope_theta = 10000.0
        if self.layer_types is None:
            every = self.global_attn_every_n_layers
            self.layer_types = [
                "full_attention" if i % every == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config has {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        raw = dict(raw)
        rope = raw.get("rope_parameters") or {}
        if isinstance(rope, dict):  # transformers 5.x layout
            if "global_rope_theta" not in raw and "rope_theta" in (rope.get("full_attention") or {}):
                raw["global_rope_theta"] = rope["full_attention"]["rope_theta"]
            if "local_rope_theta" not in raw and "rope_theta" in (rope.get("sliding_attention") or {}):
                raw["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
        if isinstance(raw.get("eos_token_id"), list):
            raw["eos_token_id"] = raw["eos_token_id"][0]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        """A `config.json` that both transformers 4.x and 5.x read as this architecture."""
        out = asdict(self)
        if out["mask_token_id"] is None:
            del out["mask_token_id"]
        out["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        return {"architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert", **out}


def activation(name: str):
    """The activation functions ModernBERT configs name (transformers' ACT2FN spellings)."""
    table = {
        "gelu": F.gelu,  # exact erf form
        "gelu_python": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "swish": F.silu,
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(table)}")
    return table[name]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # rotate_half([x1, x2]) = [-x2, x1], halves of the head dimension
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding for one theta (the half-split "rotate_half" form).

    The frequencies are recomputed in fp32 on every call (d/2 numbers) rather than stored as a
    buffer, so `model.to(torch.bfloat16)` cannot round them: a bf16 inv_freq puts the angle at
    position 511 off by ~0.5 rad.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        d = self.head_dim
        # inv_freq_k = 1 / theta^(2k / d),  k = 0 .. d/2 - 1
        exponents = torch.arange(0, d, 2, device=device, dtype=torch.float32) / d
        inv_freq = 1.0 / (self.theta**exponents)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq[None, :]  # [S, d/2], fp32
        angles = torch.cat((angles, angles), dim=-1)  # [S, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x' = x cos(p w) + rotate_half(x) sin(p w), computed in fp32;  x: [B, heads, S, d]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        q, k, v = self.project(x, cos, sin)  # each [B, heads, S, d]
        if cache is not None:  # fill: keep k, v; read: the keys are [cached canvas | fresh inputs]
            k, v = cache.keys_values(layer, k, v)  # [B, heads, S or T + S, d]
        return self.attend(q, k, v, mask)

    def project(self, x, cos, sin):
        """x [B, S, H] -> q, k, v, each [B, heads, S, d], q and k rotated."""
        B, S, H = x.shape
        qkv = self.Wqkv(x).view(B, S, 3, self.num_heads, self.head_dim)  # q, k, v outermost
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, S, d]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """q [B, heads, S, d] over keys/values [B, heads, S', d] -> [B, S, H]."""
        B, _, S, _ = q.shape
        # softmax(q k^T / sqrt(d) + mask) v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.Wo(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_activation)

    def forward(self, x):
        # [u, g] = Wi x;  out = Wo(act(u) * g)   (the gate is the SECOND half)
        u, g = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(u) * g)


def layer_norm(config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.is_global = config.layer_types[index] == "full_attention"
        self.attn_norm = layer_norm(config) if index > 0 else nn.Identity()
        self.attn = Attention(config)
        self.mlp_norm = layer_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, self.index)
        return x + self.mlp(self.mlp_norm(x))


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # padding_idx as in transformers: the pad row receives no gradient from the lookup
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.norm = layer_norm(config)

    def forward(self, input_ids):
        return self.norm(self.tok_embeddings(input_ids))


@dataclass
class KVCache:
    """Every layer's keys and values (after rotary) at every canvas position, for cached sampling.

    Fast-dLLM (arXiv 2505.22618): a denoising step that changes only a few tokens of the canvas
    reuses the keys/values of the positions it does not recompute. Two uses of the encoder:

        encoder(canvas [B, T], mask, cache=KVCache())                 # fill: a full forward that
                                                                       # stores keys/values [B, heads, T, d]
        encoder(ids [B, Q], mask, cache=cache.at(positions [B, Q]))   # the ids sit at these canvas
                                                                       # positions (>= T: unused slot)

    In the second call the inputs' queries attend to the cached keys/values of every canvas
    position they do not recompute and to their own fresh ones (at their absolute rotary
    positions); local layers keep their band, `mask` [B, T] is the canvas' attention mask.
    The fresh keys/values are not written back: they stand in for the stale cached ones, so the
    cache itself only changes at a fill. Memory per canvas token: 2 x layers x hidden x bytes
    (mmBERT-base in fp32: 2 x 22 x 768 x 4 = 135 KB).
    """

    keys: list = field(default_factory=list)  # per layer [B, heads, T, d]
    values: list = field(default_factory=list)  # per layer [B, heads, T, d]
    positions: torch.Tensor | None = None  # [B, Q] canvas positions of the inputs; None = fill

    def at(self, positions: torch.Tensor) -> "KVCache":
        """The same cache, read by inputs at canvas positions [B, Q]."""
        return KVCache(self.keys, self.values, positions)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """What layer `layer`'s queries attend to. Fill: keep the fresh k, v [B, heads, T, d] (layer 0
        starts the fill over) and return them; read: [cached canvas | fresh inputs], [B, heads, T + Q, d]."""
        if self.positions is None:
            # v is a view into the layer's whole qkv projection: keep a copy of its own, so the
            # cache holds 2 x hidden values per token, not the 3 x hidden buffer behind the view
            self.keys[layer:], self.values[layer:] = [k], [v.clone(memory_format=torch.contiguous_format)]
            return k, v
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)

    @property
    def canvas_length(self) -> int:
        return self.keys[0].shape[2]


class Encoder(nn.Module):
    """The headless ModernBertModel: ids -> final-normed hidden states [B, S, H]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config)
        self.rotary_global = Rotary(config.head_dim, config.global_rope_theta)
        self.rotary_local = Rotary(config.head_dim, config.local_rope_theta)
        self.gradient_checkpointing = False

    def attention_masks(self, attention_mask, seq_len: int, device):
        """Boolean masks for SDPA (True = may attend): global [B?, 1, 1, S] and local [B?, 1, S?, S].

        A query attends to the real keys (attention_mask) within its window (local layers:
        |i - j| <= local_attention // 2), as in transformers. A query left with no key at all
        (a padding query more than half a window past its row's end; every query of an
        all-padding row) attends to itself instead (a whole all-padding row: to every position).
        Fused SDPA kernels of torch < 2.5 return NaN for empty rows, and the next layer's values
        carry it into the real tokens. Real queries are unaffected: their own key is real.
        """
        key_ok = None
        if attention_mask is not None:
            key_ok = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
            key_ok = key_ok | ~key_ok.any(dim=-1, keepdim=True)  # an all-padding row sees everything
        half_window = self.config.local_attention // 2
        if seq_len <= half_window + 1:  # the band covers every pair: local == global
            return key_ok, key_ok
        pos = torch.arange(seq_len, device=device)
        band = (pos[:, None] - pos[None, :]).abs() <= half_window  # [S, S]
        if key_ok is None:
            return None, band[None, None]
        local = band[None, None] & key_ok  # [B, 1, S, S]
        itself = pos[:, None] == pos[None, :]  # [S, S]
        # an empty row keeps only its diagonal
        return key_ok, local | (itself & ~local.any(dim=-1, keepdim=True))

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """ids [B, S] -> final-normed states [B, S, H]; with a cache, see KVCache (fill or read)."""
        x = self.embeddings(input_ids)  # [B, S, H]
        (global_mask, local_mask), (rope_global, rope_local) = self.masks_and_rotary(x, attention_mask, cache)
        for layer in self.layers:
            cos, sin = rope_global if layer.is_global else rope_local
            mask = global_mask if layer.is_global else local_mask
            if self.gradient_checkpointing and self.training:
                x = activation_checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.final_norm(x)

    def masks_and_rotary(self, x, attention_mask, cache: KVCache | None):
        """((global, local) attention masks, (global, local) rotary cos/sin) for the inputs x [B, S, H]:
        positions 0 .. S-1 (no cache, or a fill), or the canvas positions cache.positions [B, S]
        against a cache of the canvas."""
        rotaries = (self.rotary_global, self.rotary_local)
        if cache is None or cache.positions is None:
            S = x.shape[1]
            masks = self.attention_masks(attention_mask, S, x.device)
            return masks, [rotary.cos_sin(S, x.device, x.dtype) for rotary in rotaries]  # each [S, d]
        T = cache.canvas_length
        masks = self.cached_attention_masks(cache.positions, attention_mask, T)
        slot = cache.positions.clamp(max=T - 1)  # [B, S]
        # each input's angles at its own canvas position: [B, 1, S, d]
        rope = [[t[slot][:, None] for t in rotary.cos_sin(T, x.device, x.dtype)] for rotary in rotaries]
        return masks, rope

    def cached_attention_masks(self, positions, attention_mask, canvas_length: int):
        """Boolean SDPA masks [B, 1, Q, T + Q] (global, local) for inputs at canvas positions
        [B, Q] over the keys [cached canvas (T) | fresh inputs (Q)].

        A cached key is hidden where an input recomputes that position; positions >= T are
        unused slots (hidden as keys); every input always sees its own fresh key, so no row is
        empty. Local layers: |i - j| <= local_attention // 2 by canvas position.
        """
        B, Q = positions.shape
        T, device = canvas_length, positions.device
        valid = positions < T  # [B, Q]
        slot = positions.clamp(max=T - 1)
        canvas = torch.arange(T, device=device)
        recomputed = ((positions[:, :, None] == canvas) & valid[:, :, None]).any(1)  # [B, T]
        cached_ok, fresh_ok = ~recomputed, valid
        if attention_mask is not None:
            canvas_ok = attention_mask.bool()
            cached_ok = cached_ok & canvas_ok
            fresh_ok = fresh_ok & canvas_ok.gather(1, slot)
        key_ok = torch.cat([cached_ok, fresh_ok], 1)[:, None, :]  # [B, 1, T + Q]
        key_position = torch.cat([canvas.expand(B, T), slot], 1)  # [B, T + Q]
        itself = torch.cat([torch.zeros(Q, T, dtype=torch.bool, device=device),
                            torch.eye(Q, dtype=torch.bool, device=device)], 1)  # [Q, T + Q]
        band = (slot[:, :, None] - key_position[:, None, :]).abs() <= self.config.local_attention // 2
        global_mask = key_ok | itself  # [B, Q, T + Q]
        local_mask = (key_ok & band) | itself
        return global_mask[:, None], local_mask[:, None]


class PredictionHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = activation(config.classifier_activation)
        self.norm = layer_norm(config)

    def forward(self, h):
        return self.norm(self.act(self.dense(h)))


class ModernBertMLM(nn.Module):
    """Encoder + MLM head. One output per method:

      model(ids, attention_mask)                     -> logits [B, S, V]
      model(ids, attention_mask, logits_at=sel)      -> logits [N, V] at a bool [B, S] selection, its
                                                        True entries in row-major order (N = sel.sum())
      logits_at_positions(ids, attention_mask, pos)  -> logits [B, K, V] at positions [B, K] per row
      features(ids, attention_mask, at)              -> the head's output [N, H], the decoder's input
                                                        (chunked_loss); `model(..., features_at=at)`
                                                        is the same call made through forward
      hidden(ids, attention_mask, cache)             -> final-normed encoder states [B, S, H]

    The head and the vocabulary-wide decoder run only where asked (docs/math.md: the decoder costs
    more than all layers together). `features_at` goes through forward for one reason: a wrapper
    such as DistributedDataParallel synchronises the gradients of forward calls only.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Encoder(config)
        self.head = PredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' init: truncated normals, output projections scaled by 1/sqrt(2L)."""
        c = self.config
        std_in = c.initializer_range
        std_out = c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)

        def init(linear_or_emb, std):
            cut = c.initializer_cutoff_factor * std
            nn.init.trunc_normal_(linear_or_emb.weight, 0.0, std, -cut, cut)
            if getattr(linear_or_emb, "bias", None) is not None:
                nn.init.zeros_(linear_or_emb.bias)

        init(self.model.embeddings.tok_embeddings, std_in)
        for layer in self.model.layers:
            init(layer.attn.Wqkv, std_in)
            init(layer.attn.Wo, std_out)
            init(layer.mlp.Wi, std_in)
            init(layer.mlp.Wo, std_out)
        init(self.head.dense, std_out)
        if not c.tie_word_embeddings:
            init(self.decoder, std_out)
        elif self.decoder.bias is not None:
            nn.init.zeros_(self.decoder.bias)

    def hidden(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """Final-normed encoder states [B, S, H] (cache: see KVCache)."""
        return self.model(input_ids, attention_mask, cache)

    def head_features(self, h, at):
        """head(h) at selected positions, the decoder's input: [B, S, H] -> [N, H].

        at: bool [B, S] (the True entries in row-major order) or long [N], indices into the
        flattened [B * S] positions (e.g. `selected.flatten().nonzero().squeeze(1)`, no host
        sync here). Losses that apply the decoder chunk by chunk use this (chunked_loss).
        """
        rows = h[at] if at.dtype == torch.bool else h.flatten(0, 1).index_select(0, at)  # [N, H]
        return self.head(rows)

    def logits_from_hidden(self, h):
        """[..., H] -> [..., V]: decoder(head(h))."""
        return self.decoder(self.head(h))

    def forward(self, input_ids, attention_mask=None, logits_at=None, features_at=None):
        """Logits [B, S, V], or [N, V] at the bool selection logits_at [B, S]; with features_at,
        `features(input_ids, attention_mask, features_at)` [N, H] instead (see the class)."""
        if features_at is not None:
            return self.features(input_ids, attention_mask, features_at)  # [N, H]
        if logits_at is not None and logits_at.dtype != torch.bool:
            raise TypeError("logits_at is a bool [B, S] selection (positions per row: logits_at_positions)")
        h = self.hidden(input_ids, attention_mask)  # [B, S, H]
        return self.logits_from_hidden(h if logits_at is None else h[logits_at])  # [B, S, V] or [N, V]

    def logits_at_positions(self, input_ids, attention_mask, positions):
        """Logits [B, K, V] at canvas positions [B, K] of each row (gathered: no host sync)."""
        h = self.hidden(input_ids, attention_mask)  # [B, S, H]
        return self.logits_from_hidden(h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1])))

    def features(self, input_ids, attention_mask, at):
        """The head's output at selected positions, the decoder's input: [N, H] (see head_features)."""
        return self.head_features(self.hidden(input_ids, attention_mask), at)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied decoder weight counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
