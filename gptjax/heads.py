"""Task heads on the GPT trunk, with GPT-1's input transformations (Radford et al. 2018, Fig. 1).

- classify: [start] text [extract]; a linear head on the extract token's final hidden state.
- entail: [start] premise [delim] hypothesis [extract]; the same.
- similarity: both orderings of the pair; their two extract states are added, then the head.
- multiple_choice: [start] context [delim] answer_k [extract], one sequence per choice; a shared
  linear layer gives each one logit, and the softmax runs over the choices.
- token_classify: [start] tokens; the head on every token's state.
- sft: [start] prompt completion [end]; no head: next-token loss on the completion only.
(The sequences are built by `gptjax.data.sft`.)

Batch arrays (every one at least 2-D, so that one sharding spec splits them all over the batch):
`inputs` int32 [B, L] or [B, K, L] (K orderings or choices); `extract` int32 [B, 1] or [B, K], the
index of each sequence's extract token; `labels` int32 [B, 1] (class, or the right choice) or
[B, L] (token classes); `label_weights` float32 like `labels` (0 = padding example or unlabelled
token); for GPT-1's auxiliary LM loss, `targets` and `weights` shaped like `inputs`.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import loss as loss_lib
from gptjax.model import Linear

Array = jax.Array
TASKS = ("classify", "entail", "similarity", "multiple_choice", "token_classify", "sft")
PAIR_TASKS = ("entail", "similarity")  # two text fields


def num_outputs(task: str, num_classes: int) -> int:
  """Outputs of the linear head: one score per choice for multiple choice, else one per class."""
  return 1 if task == "multiple_choice" else num_classes


class Head(nn.Module):
  """Dropout, then a linear layer D -> outputs (float32 logits). GPT-1: classifier dropout 0.1."""

  outputs: int
  dropout: float = 0.0
  init_std: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_xD: Array, deterministic: bool = True) -> Array:
    x_xD = nn.Dropout(self.dropout)(x_xD, deterministic=deterministic)
    out = Linear((x_xD.shape[-1],), (self.outputs,), ("embed", None), self.init_std, self.dtype,
                 name="out")
    return out(x_xD).astype(jnp.float32)


def at_extract(h_NxLxD: Array, extract_N: Array) -> Array:
  """The hidden state [N, D] of each sequence at its extract token."""
  return jnp.take_along_axis(h_NxLxD, extract_N[:, None, None], axis=1)[:, 0]


def task_logits(task: str, trunk: Callable[[Array], Array], head: Callable[[Array], Array],
                batch: dict[str, Array]) -> tuple[Array, Array]:
  """The head's logits for `batch`, and the trunk's hidden states (for an auxiliary LM loss).

  Args:
    task: one of TASKS except 'sft'.
    trunk: tokens [N, L] -> final hidden states [N, L, D].
    head: hidden states [..., D] -> logits [..., outputs].
    batch: the task's arrays (see the module docstring).

  Returns:
    (logits, h_NxLxD): logits [B, C] (sequence tasks), [B, K] (multiple choice: one per choice) or
    [B, L, C] (token classification); h for the N = B or B·K sequences.
  """
  inputs = batch["inputs"]
  h_NxLxD = trunk(inputs.reshape(-1, inputs.shape[-1]))
  if task == "token_classify":
    return head(h_NxLxD), h_NxLxD
  lead = inputs.shape[:-1]  # [B] or [B, K]
  x_xD = at_extract(h_NxLxD, batch["extract"].reshape(-1)).reshape(lead + (h_NxLxD.shape[-1],))
  if task == "similarity":  # the two orderings' representations are added (GPT-1)
    x_xD = x_xD.sum(axis=1)
  logits = head(x_xD)
  return (logits[..., 0] if task == "multiple_choice" else logits), h_NxLxD


def loss_sums(logits: Array, labels: Array, label_weights: Array) -> tuple[Array, Array]:
  """(sum of weighted cross-entropies, sum of weights) of `logits` [*labels.shape or [B], C]."""
  logits = logits.reshape(labels.shape + (logits.shape[-1],))
  return loss_lib.cross_entropy_sum(logits, labels, label_weights)


def predictions(logits: Array, labels: Array) -> Array:
  """The argmax class (or choice), shaped like `labels`."""
  return jnp.argmax(logits, axis=-1).reshape(labels.shape)
