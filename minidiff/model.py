"""ModernBERT (mmBERT) encoder with its masked-language-model head, in one file. References:
ModernBERT (arXiv 2412.13663), mmBERT (2509.06888). Matches transformers' `ModernBertForMaskedLM`
to 1e-4; module and parameter names equal a checkpoint's keys (`model.layers.3.attn.Wqkv.weight`,
`head.dense.weight`, `decoder.bias`, ...), so a checkpoint loads with a plain `load_state_dict`.

    x = LayerNorm(E[ids])
    for each layer l:   x = x + Wo(attn(rope(attn_norm(x))))      (layer 0: no attn_norm)
                        x = x + Wo_mlp(gelu(u) * g),  [u, g] = Wi(mlp_norm(x))
    h = final_norm(x);  logits = decoder(head.norm(gelu(head.dense(h))))
Layer l is global when l % global_attn_every_n_layers == 0, else local: query i sees key j
only when |i - j| <= local_attention // 2. Saving: minidiff/plumbing/checkpoint.py; key/value
caches and packed CPU products: minidiff/speed/."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


@dataclass
class ModelConfig:
    """transformers' `ModernBertConfig` fields and defaults. `from_dict`/`from_json` read both
    config.json layouts (4.x: `*_rope_theta`, `global_attn_every_n_layers`; 5.x: `rope_parameters`,
    `layer_types`) and ignore unknown keys."""
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
            self.local_rope_theta = 10000.0
        if self.layer_types is None:
            every = self.global_attn_every_n_layers
            self.layer_types = ["full_attention" if i % every == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"config has {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

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
        return cls(**{k: v for k, v in raw.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        """A `config.json` that both transformers 4.x and 5.x read as this architecture."""
        out = asdict(self)
        if out["mask_token_id"] is None:
            del out["mask_token_id"]
        out["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}}
        return {"architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert", **out}


def activation(name: str):
    """The activation functions ModernBERT configs name (transformers' ACT2FN spellings)."""
    tanh_gelu = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    table = {"gelu": F.gelu, "gelu_python": F.gelu, "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu,
             "silu": F.silu, "swish": F.silu, "relu": F.relu}  # "gelu": the exact erf form
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(table)}")
    return table[name]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # rotate_half([x1, x2]) = [-x2, x1], halves of the head dimension
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_table(theta: float, d: int, seq_len: int, device, dtype):
    """cos, sin [S, d] of the rotary angles p w_k (the half-split "rotate_half" form), in fp32 on every
    call: a stored buffer would be rounded by `model.to(torch.bfloat16)`; only cos and sin are cast."""
    # w_k = 1 / theta^(2k / d),  k = 0 .. d/2 - 1
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq  # [S, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [S, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x' = x cos(p w) + rotate_half(x) sin(p w);  x: [B, heads, S, d], cos/sin [S, d] in x's dtype
    return x * cos + rotate_half(x) * sin


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers' products run in: autocast's where it is on, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask):
        return self.attend(*self.project(x, cos, sin), mask)

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

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
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


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask (0 / -inf) SDPA would otherwise build from a boolean one in every layer."""
    return None if mask is None else torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, -math.inf)


class Encoder(nn.Module):
    """The headless ModernBertModel: ids -> final-normed hidden states [B, S, H]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config)
        self.gradient_checkpointing = False

    def attention_masks(self, attention_mask, seq_len: int, device):
        """Boolean masks for SDPA (True = may attend): global [B?, 1, 1, S] and local [B?, 1, S?, S]: the
        real keys within the query's window (local: |i - j| <= local_attention // 2), as transformers. A
        query with no key (padding half a window past its row's end) sees itself, an all-padding row every
        position: an empty softmax row is NaN in some SDPA kernels and reaches real queries (0 x NaN)."""
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

    def rotary_and_masks(self, x, attention_mask):
        """{is_global: ((cos, sin) [S, d], additive mask)} for the inputs x [B, S, H], in the layers'
        compute dtype: built once per forward and shared by the layers (the local mask is [B, 1, S, S])."""
        S, dtype, c = x.shape[1], compute_dtype(x), self.config
        global_mask, local_mask = (additive(m, dtype) for m in self.attention_masks(attention_mask, S, x.device))
        tables = {theta: rotary_table(theta, c.head_dim, S, x.device, dtype)  # one per distinct theta
                  for theta in {c.global_rope_theta, c.local_rope_theta}}
        return {True: (tables[c.global_rope_theta], global_mask), False: (tables[c.local_rope_theta], local_mask)}

    def forward(self, input_ids, attention_mask=None):
        """ids [B, S] -> final-normed states [B, S, H]."""
        x = self.embeddings(input_ids)  # [B, S, H]
        per_kind = self.rotary_and_masks(x, attention_mask)
        for layer in self.layers:
            (cos, sin), mask = per_kind[layer.is_global]
            if self.gradient_checkpointing and self.training:
                x = activation_checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.final_norm(x)


class PredictionHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = activation(config.classifier_activation)
        self.norm = layer_norm(config)

    def forward(self, h):
        return self.norm(self.act(self.dense(h)))


class ModernBertMLM(nn.Module):
    """Encoder + MLM head:

      model(ids, attention_mask)                     -> logits [B, S, V]
      model(ids, attention_mask, logits_at=sel)      -> logits [N, V] at a bool [B, S] selection, its
                                                        True entries in row-major order (N = sel.sum())
      logits_at_positions(ids, attention_mask, pos)  -> logits [B, K, V] at positions [B, K] per row
      hidden(ids, attention_mask)                    -> final-normed encoder states [B, S, H]

    The head and the vocabulary-wide decoder run only where asked (docs/math.md, 7); `decode=False`
    gives the decoder's input instead, for speed/chunked_loss.py (through forward, which DDP watches)."""

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
        std_in, std_out = c.initializer_range, c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)

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

    def hidden(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask)

    def forward(self, input_ids, attention_mask=None, logits_at=None, decode: bool = True):
        """Logits [B, S, V], or [N, V] at the bool selection logits_at [B, S] (decode=False: see the class)."""
        if logits_at is not None and logits_at.dtype != torch.bool:
            raise TypeError("logits_at is a bool [B, S] selection (positions per row: logits_at_positions)")
        h = self.hidden(input_ids, attention_mask)  # [B, S, H]
        features = self.head(h if logits_at is None else h[logits_at])  # [B, S, H] or [N, H]
        return self.decoder(features) if decode else features  # [B, S, V] or [N, V]

    def logits_at_positions(self, input_ids, attention_mask, positions):
        """Logits [B, K, V] at canvas positions [B, K] of each row (gathered: no host sync)."""
        h = self.hidden(input_ids, attention_mask)  # [B, S, H]
        return self.decoder(self.head(h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))))

    def num_parameters(self) -> int:
        """Distinct parameters (the tied decoder weight counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters live on (the CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
