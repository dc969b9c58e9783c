"""Bidirectional DiT-style transformer for token sequences.

(z_t, t, cond) -> logits. Tokens (V real ones plus the mask id V) are embedded,
positions enter as a learned absolute embedding or as rotary embeddings (RoPE)
in the attention, `depth` pre-norm blocks of full (non-causal) self-attention
and a gated MLP follow, each modulated by adaLN-zero: per block
shift/scale/gate vectors from the conditioning vector
c = TimeEmbedding(t) + LabelEmbedding(cond), projections initialised to zero so
every block starts as the identity. A final adaLN and a linear head give
logits over the V real tokens.

Two designs share this code (attributes, see configs/text8.py):
  MD4 paper: RoPE, sigmoid GLU (hidden 8/3 width rounded to 32), a narrow
    conditioning vector (64) read through a sigmoid, zero-initialised head
    without bias (text8 also embeds tokens in 64 dims and projects them).
  wide_cond: learned positions, SwiGLU, conditioning as wide as the model read
    through swish, a lecun-initialised head with bias.

Without a conditioning vector (time_features='none' and no classes) the
modulation comes from a learned constant instead, which keeps one code path and
makes the output provably independent of t.

Inputs of any shape [B, *data_shape] are flattened to [B, prod(data_shape)]
and the logits reshaped back, so the same network also runs on images.

Logical axis names on parameters (map them to mesh axes in parallel.py):
  'vocab'   token embedding rows / logits        (embedding, head)
  'embed'   residual width                       (everywhere)
  'length'  positions                            (pos_embedding)
  'heads'   attention heads                      (query/key/value/out)
  'kv'      per-head width                       (query/key/value/out)
  'mlp'     MLP hidden, time-MLP hidden          (wi_gate/wi_up/wi/wo)
  'cond'    conditioning width                   (time/label embedding, adaLN)
  'norm'    LayerNorm scale/bias (affine norms only)
  'layers'  the stacked block axis with scan_layers=True
  None      the chunk axis of adaLN projections (replicated)

Activations carry logical constraints (no-ops without rules + mesh context): the
residual stream at every block boundary ('activation_batch',
'activation_length', 'activation_embed') and the logits ('activation_batch',
'activation_length', 'activation_vocab').

Memory knobs: `remat_policy` rematerialises each block with a
jax.checkpoint policy (layers.REMAT_POLICIES); `scan_layers` runs the blocks as
one `nn.scan` over stacked parameters (one compiled block, and the backward
pass recomputes block by block inside the loop, which is what makes remat
effective on backends whose scheduler may hoist recomputation, e.g. CPU).
The transformer is a `contract.FusedHeadNetwork`: `features` hands the final
features and the head's parameters to the loss (contract.HeadInputs).
"""

import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.networks import attention
from md4_jax.networks import conditioning
from md4_jax.networks import contract
from md4_jax.networks import head as head_lib
from md4_jax.networks import layers

Array = jax.Array
Dtype = Any


# mlp value -> (activation, gated). Gated MLPs: act(x W_gate) * (x W_up) -> W_out, no biases,
# hidden = mlp_ratio * width * 2/3 rounded up; 'gelu': the ViT/DiT MLP, with biases,
# hidden = mlp_ratio * width.
MLPS = {
    "swiglu": (nn.swish, True),  # Shazeer (2020); LLaMA.
    "glu": (nn.sigmoid, True),  # The original sigmoid GLU (Dauphin et al.): the MD4 paper's.
    "gelu": (nn.gelu, False),  # DiT blocks (UViT).
}

# cond_act value -> the activation applied to the conditioning vector before each adaLN
# projection (DiT: swish; the MD4 paper's text transformer: sigmoid).
COND_ACTS = {"swish": nn.swish, "sigmoid": nn.sigmoid}

POSITIONS = ("learned", "rope")  # Learned absolute embeddings | rotary (attention.apply_rope).


class Dropouts(NamedTuple):
  """Where a block drops, at the network's dropout_rate (see DROPOUTS)."""
  channel_attn: bool      # The attention output: one mask per example and channel, shared
                          # across positions (layers.dropout), or element by element.
  channel_mlp: bool       # The MLP output: likewise.
  probabilities: bool     # Attention probabilities, element by element.
  mlp_hidden: bool        # The MLP's hidden activations, element by element.
  embeddings: bool        # Unprojected token embeddings (embed_dim 0), element by element.


# dropout value -> where the blocks drop (layers.dropout).
DROPOUTS = {
    # The MD4 paper's text transformer: channel masks on the attention and MLP outputs, plus
    # attention probabilities (and the token embeddings when they are not projected).
    "channel": Dropouts(True, True, True, False, True),
    # The MD4 paper's DiT blocks (UViT): a channel mask on the attention output, attention
    # probabilities, element-wise after the GELU and after the MLP output.
    "dit": Dropouts(True, False, True, True, False),
    # md4_jax's own: element-wise on the attention and MLP outputs.
    "element": Dropouts(False, False, False, False, False),
}


def check_dropout_kwargs(kwargs: Mapping[str, Any], group: str) -> None:
  """A known `dropout`, and no attention-probability dropout on a fused kernel (cudnn, pallas)."""
  layers.check_choice(kwargs["dropout"], DROPOUTS, f"{group}.dropout")
  if (DROPOUTS[kwargs["dropout"]].probabilities and kwargs["dropout_rate"] > 0
      and kwargs["attention_impl"] in ("cudnn", "pallas")):
    raise ValueError(f"{group}.dropout={kwargs['dropout']!r} drops attention probabilities, "
                     f"which the {kwargs['attention_impl']} kernel cannot: use attention_impl "
                     f"auto, xla or chunked, or {group}.dropout='element'.")


def mlp_kernel_init(init: str, depth: int):
  """The MLP kernels' initialiser: 'md4' (the paper's depth-scaled init) a truncated normal
  of variance 2 / (depth * fan_in); 'md4_jax' lecun normal (variance 1 / fan_in)."""
  conditioning.check_init(init)
  if init == "md4":
    return nn.initializers.variance_scaling(2.0 / depth, "fan_in", "truncated_normal")
  return nn.initializers.lecun_normal()


def mlp_hidden(mlp: str, width: int, mlp_ratio: float, multiple_of: int = 8) -> int:
  """Hidden width of `mlp`: gated ones mlp_ratio * width * 2/3 (same parameters as an
  ungated mlp_ratio MLP), rounded up to multiple_of; 'gelu' mlp_ratio * width."""
  layers.check_choice(mlp, MLPS, "mlp")
  hidden = int(mlp_ratio * width * 2 / 3) if MLPS[mlp][1] else int(mlp_ratio * width)
  return max(multiple_of, -(-hidden // multiple_of) * multiple_of)


class AdaLNModulation(nn.Module):
  """c -> `num_chunks` modulation vectors (adaLN-zero).

  With c given: Dense(act(c)) with zero-initialised kernel and bias. With c
  None: a learned constant initialised to zero. Either way every chunk starts at
  zero (shift = scale = gate = 0).

  Attributes:
    num_chunks: number of vectors returned.
    features: width of each vector.
    cond_act: key of COND_ACTS.
  """

  num_chunks: int
  features: int
  cond_act: str = "swish"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c_BxC: Optional[Array]) -> tuple[Array, ...]:
    """Returns `num_chunks` [B, 1, features] arrays ([1, 1, ...] if no c)."""
    shape = (self.num_chunks, self.features)
    if c_BxC is None:
      mod_BxKxD = self.param(
          "constant",
          layers.partitioned(nn.initializers.zeros, (None, "embed")),
          shape,
          self.param_dtype,
      )[None].astype(self.dtype)
    else:
      mod_BxKxD = layers.dense(
          shape,
          ("cond", None, "embed"),
          kernel_init=nn.initializers.zeros,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="dense",
      )(COND_ACTS[self.cond_act](c_BxC))
    return tuple(mod_BxKxD[:, None, k] for k in range(self.num_chunks))


class MLP(nn.Module):
  """The block's MLP (see MLPS): gated act(x W_gate) * (x W_up) -> W_out without
  biases ('wi_gate', 'wi_up', 'wo'), or Dense -> GELU -> Dense with biases ('wi', 'wo').

  Attributes:
    hidden: hidden width.
    mlp: key of MLPS.
    kernel_init: initialiser of every kernel (mlp_kernel_init).
    hidden_dropout_rate: element-wise dropout of the hidden activations (train=True).
  """

  hidden: int
  mlp: str = "swiglu"
  kernel_init: Any = nn.initializers.lecun_normal()
  hidden_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool = False) -> Array:
    """[B, L, D] -> [B, L, D]."""
    act, gated = MLPS[self.mlp]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=not gated,
              kernel_init=self.kernel_init)
    width = x_BxLxD.shape[-1]
    if gated:
      gate_BxLxF = layers.dense(self.hidden, ("embed", "mlp"), name="wi_gate", **kw)(x_BxLxD)
      up_BxLxF = layers.dense(self.hidden, ("embed", "mlp"), name="wi_up", **kw)(x_BxLxD)
      h_BxLxF = act(gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = act(layers.dense(self.hidden, ("embed", "mlp"), name="wi", **kw)(x_BxLxD))
    if self.hidden_dropout_rate > 0:
      h_BxLxF = layers.dropout(self.hidden_dropout_rate)(h_BxLxF, deterministic=not train)
    return layers.dense(width, ("mlp", "embed"), name="wo", **kw)(h_BxLxF)


class TransformerBlock(nn.Module):
  """Pre-norm attention + MLP block with adaLN-zero modulation.

  Attributes:
    num_heads: attention heads.
    mlp_hidden: MLP hidden width.
    dropout_rate: dropout after attention and after the MLP.
    attention_impl: see attention.ATTENTION_IMPLS.
    mlp: key of MLPS.
    rope: rotary position embedding in the attention.
    cond_act: key of COND_ACTS.
    qkv_bias: biases on the query/key/value projections.
    norm_eps: epsilon of the two LayerNorms.
    dropout: key of DROPOUTS (where dropout_rate applies).
    mlp_kernel_init: initialiser of the MLP's kernels.
  """

  num_heads: int
  mlp_hidden: int
  dropout_rate: float = 0.0
  attention_impl: str = "xla"
  mlp: str = "swiglu"
  rope: bool = False
  cond_act: str = "swish"
  qkv_bias: bool = False
  norm_eps: float = 1e-6
  dropout: str = "element"
  mlp_kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_BxLxD: Array, c_BxC: Optional[Array], train: bool
  ) -> Array:
    """[B, L, D] (and [B, C] conditioning or None) -> [B, L, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layers.check_choice(self.dropout, DROPOUTS, "dropout")
    drops, rate = DROPOUTS[self.dropout], self.dropout_rate
    width = x_BxLxD.shape[-1]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = AdaLNModulation(
        6, width, self.cond_act, name="modulation", **kw
    )(c_BxC)

    norm = lambda name: layers.layer_norm(affine=False, epsilon=self.norm_eps, name=name, **kw)
    h_BxLxD = norm("norm_attn")(x_BxLxD)
    h_BxLxD = conditioning.modulate(h_BxLxD, shift_a, scale_a)
    h_BxLxD = attention.SelfAttention(
        self.num_heads, attention_impl=self.attention_impl, rope=self.rope,
        qkv_bias=self.qkv_bias, dropout_rate=rate if drops.probabilities else 0.0,
        name="attn", **kw
    )(h_BxLxD, train)
    h_BxLxD = layers.dropout(rate, drops.channel_attn)(h_BxLxD, deterministic=not train)
    x_BxLxD = x_BxLxD + gate_a * h_BxLxD

    h_BxLxD = norm("norm_mlp")(x_BxLxD)
    h_BxLxD = conditioning.modulate(h_BxLxD, shift_m, scale_m)
    h_BxLxD = MLP(self.mlp_hidden, self.mlp, self.mlp_kernel_init,
                  rate if drops.mlp_hidden else 0.0, name="mlp", **kw)(h_BxLxD, train)
    h_BxLxD = layers.dropout(rate, drops.channel_mlp)(h_BxLxD, deterministic=not train)
    return layers.constrain(x_BxLxD + gate_m * h_BxLxD, layers.ACTIVATION_BxLxD)


class ScannedBlock(nn.Module):
  """A (possibly rematerialised) TransformerBlock as an nn.scan body.

  Attributes:
    block_kwargs: TransformerBlock attributes (num_heads, mlp_hidden, ...).
    train: dropout on.
    remat_policy: key of layers.REMAT_POLICIES.
  """

  block_kwargs: dict
  train: bool
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x_BxLxD: Array, c_BxC: Optional[Array]):
    """(carry [B, L, D], broadcast c) -> (carry, None)."""
    # Inside a loop the recomputation cannot be hoisted: no CSE barrier needed.
    block_cls = layers.remat(
        TransformerBlock, self.remat_policy, static_argnums=(3,), prevent_cse=False
    )
    return block_cls(**self.block_kwargs, name="block")(x_BxLxD, c_BxC, self.train), None


class Transformer(nn.Module, contract.FusedHeadNetwork):
  """MD4 denoising transformer: (z, t, cond) -> logits over the V real tokens.

  Attributes:
    vocab_size: V; inputs lie in [0, V] with V the mask id.
    data_shape: shape of one example; the network has max_length =
      prod(data_shape) positions and takes any input with at most that many.
    width: residual width.
    depth: number of blocks.
    num_heads: attention heads (width % num_heads == 0).
    mlp_ratio: MLP hidden = mlp_ratio * width (x 2/3 for gated MLPs, rounded up).
    num_classes: class labels for conditioning (0 = unconditional).
    time_features: 't' or 'none' (see conditioning.TIME_FEATURES).
    dropout_rate: dropout probability (active with train=True).
    dtype: activation dtype.
    param_dtype: parameter dtype.
    remat_policy: what each block keeps for the backward pass (a key of
      layers.REMAT_POLICIES; 'none' keeps everything).
    scan_layers: run the blocks as one nn.scan over parameters stacked along
      a leading 'layers' axis (params under 'blocks/block' instead of
      'block_0' ... 'block_{depth-1}').
    attention_impl: see attention.ATTENTION_IMPLS.
    cond_dim: width of the conditioning vector (time + label embedding) that
      every adaLN projection reads (0 = width; the MD4 paper's: 64).
    cond_act: activation of c before each adaLN projection (COND_ACTS).
    time_embedding: widths of the time MLP (conditioning.TIME_EMBEDDINGS).
    mlp: the blocks' MLP (MLPS): swiglu | glu (the paper's) | gelu.
    mlp_multiple_of: the MLP hidden width is rounded up to a multiple of this.
    positions: POSITIONS: learned absolute embeddings | rope.
    embed_dim: token embedding width (0 = width); smaller ones are projected to
      the width by a Dense with bias (the paper's text8 network: 64).
    head_bias: bias on the output head.
    zero_init_head: zero-initialised head kernel (uniform first prediction).
    sinusoid: the time sinusoid (conditioning.SINUSOIDS): md4 (the paper's) | dit.
    label_cond: where the label embedding joins (conditioning.LABEL_CONDS): concat | add.
    norm_eps: epsilon of every LayerNorm (the paper's 1e-5; md4_jax's 1e-6).
    dropout: where dropout_rate applies (DROPOUTS): channel (the paper's) | element.
    vocab_multiple: the head's V columns and the embedding's V + 1 rows are rounded up to a
      multiple of this (1 = not padded), so the vocabulary splits over mesh.tensor
      (GPT-2's V = 50257 divides by nothing); the padding is never predicted (the head's
      padding columns are set to the lowest logit, the call returns the V real ones).
    param_init: conditioning.INITS: 'md4' (the paper's) initialises the token and label embeddings
      with Flax's default (std 1 / sqrt(embed width)) and the MLP kernels depth-scaled
      (variance 2 / (depth * fan_in)); 'md4_jax' with std 0.02 and lecun normal.
  """

  vocab_size: int
  data_shape: Sequence[int]
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  time_features: str = "t"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str = "xla"
  cond_dim: int = 0
  cond_act: str = "swish"
  time_embedding: str = "dit"
  mlp: str = "swiglu"
  mlp_multiple_of: int = 8
  positions: str = "learned"
  embed_dim: int = 0
  head_bias: bool = True
  zero_init_head: bool = False
  sinusoid: str = "dit"
  label_cond: str = "add"
  norm_eps: float = 1e-6
  dropout: str = "element"
  param_init: str = "md4_jax"
  vocab_multiple: int = 1

  @classmethod
  def check_kwargs(cls, kwargs: Mapping[str, Any], group: str) -> None:
    """The named choices among `kwargs` are known (one-line ValueErrors naming `group`)."""
    layers.check_choice(kwargs["mlp"], MLPS, f"{group}.mlp")
    layers.check_choice(kwargs["cond_act"], COND_ACTS, f"{group}.cond_act")
    layers.check_choice(kwargs["positions"], POSITIONS, f"{group}.positions")
    conditioning.check_kwargs(kwargs, group)
    check_dropout_kwargs(kwargs, group)

  @property
  def max_length(self) -> int:
    """Number of positions: prod(data_shape)."""
    return math.prod(self.data_shape)

  def __call__(self, z: Array, t: Array, cond: Optional[Array] = None,
               train: bool = False) -> Array:
    """[B, *data_shape] tokens -> [B, *data_shape, V] float32 logits (see `features`)."""
    feats = self.features(z, t, cond, train)
    batch_size, data_shape = z.shape[0], z.shape[1:]
    h_BxLxD = feats.h.reshape(batch_size, -1, self.width)
    logits_BxLxV = feats.logits(h_BxLxD)  # Carries the logits' activation constraint.
    logits_BxLxV = logits_BxLxV[..., :self.vocab_size]  # Without the head's padding.
    return logits_BxLxV.astype(jnp.float32).reshape(batch_size, *data_shape, self.vocab_size)

  @nn.compact
  def features(
      self,
      z: Array,
      t: Array,
      cond: Optional[Array] = None,
      train: bool = False,
  ) -> contract.HeadInputs:
    """The final features and the head's parameters.

    Args:
      z: [B, *data_shape] int tokens in [0, V].
      t: [B] float times in [0, 1] (ignored if time_features == 'none').
      cond: [B] int labels in [0, num_classes), or None.
      train: enables dropout (rng stream 'dropout').

    Returns:
      contract.HeadInputs: h [B, *data_shape, D] and the head's kernel and bias.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch_size, data_shape = z.shape[0], z.shape[1:]
    length = int(np.prod(data_shape))
    if length > self.max_length:
      raise ValueError(f"{length} positions > max_length {self.max_length}.")
    z_BxL = z.reshape(batch_size, length)

    layers.check_choice(self.positions, POSITIONS, "positions")
    layers.check_choice(self.cond_act, COND_ACTS, "cond_act")
    layers.check_choice(self.dropout, DROPOUTS, "dropout")
    c_BxC = conditioning.Conditioning(
        self.cond_dim or self.width,
        self.time_features,
        self.num_classes,
        self.time_embedding,
        self.sinusoid,
        self.label_cond,
        self.param_init,
        name="conditioning",
        **kw,
    )(t, cond, batch_size)

    embed_dim = self.embed_dim or self.width
    x_BxLxD = nn.Embed(
        head_lib.padded(self.vocab_size + 1, self.vocab_multiple),  # V tokens and the mask.
        embed_dim,
        embedding_init=layers.partitioned(
            conditioning.embedding_init(self.param_init, 0.02), ("vocab", "embed")
        ),
        name="token_embedding",
        **kw,
    )(z_BxL)
    if embed_dim != self.width:
      x_BxLxD = layers.dense(self.width, (None, "embed"), name="embed_proj", **kw)(x_BxLxD)
    elif DROPOUTS[self.dropout].embeddings:  # As the paper's code (its embed_input).
      x_BxLxD = layers.dropout(self.dropout_rate)(x_BxLxD, deterministic=not train)
    if self.positions == "learned":
      pos_LxD = self.param(
          "pos_embedding",
          layers.partitioned(
              nn.initializers.normal(stddev=0.02), ("length", "embed")
          ),
          (self.max_length, self.width),
          self.param_dtype,
      )
      x_BxLxD = x_BxLxD + pos_LxD[None, :length].astype(self.dtype)
    x_BxLxD = layers.constrain(x_BxLxD, layers.ACTIVATION_BxLxD)

    block_kwargs = dict(
        num_heads=self.num_heads,
        mlp_hidden=mlp_hidden(self.mlp, self.width, self.mlp_ratio, self.mlp_multiple_of),
        dropout_rate=self.dropout_rate,
        attention_impl=self.attention_impl,
        mlp=self.mlp,
        rope=self.positions == "rope",
        cond_act=self.cond_act,
        norm_eps=self.norm_eps,
        dropout=self.dropout,
        mlp_kernel_init=mlp_kernel_init(self.param_init, self.depth),
        **kw,
    )
    if self.scan_layers:
      stack = nn.scan(
          ScannedBlock,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast,
          length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BxLxD, _ = stack(block_kwargs, train, self.remat_policy, name="blocks")(
          x_BxLxD, c_BxC
      )
    else:
      block_cls = layers.remat(
          TransformerBlock, self.remat_policy, static_argnums=(3,)
      )
      for i in range(self.depth):
        x_BxLxD = block_cls(**block_kwargs, name=f"block_{i}")(
            x_BxLxD, c_BxC, train
        )

    shift, scale = AdaLNModulation(
        2, self.width, self.cond_act, name="final_modulation", **kw
    )(c_BxC)
    x_BxLxD = layers.layer_norm(affine=False, epsilon=self.norm_eps, name="final_norm",
                                **kw)(x_BxLxD)
    x_BxLxD = conditioning.modulate(x_BxLxD, shift, scale)
    head_width = head_lib.padded(self.vocab_size, self.vocab_multiple)
    feats = head_lib.LinearHead(head_width,
                                self.vocab_size if head_width > self.vocab_size else None,
                                use_bias=self.head_bias, zero_init=self.zero_init_head,
                                name="head", **kw).inputs(x_BxLxD)
    return feats._replace(h=feats.h.reshape(batch_size, *data_shape, self.width))
