"""The top k layers of a model, finetuned alone. (An early exit, a model's first k layers, is loaded as such:
`convert.first_layers`.)

Finetuning only the top k layers of a model (`train.trainable_layers=k`) leaves the output of its lower layers
unchanged from step to step, so it is computed once per model and example (`probe.extract_prompt_states`, cached
on disk like probe features) and every finetuning run trains the top layers, the final norm and the head on it.
That is the same computation as finetuning the whole model with the lower layers frozen (tested), at k / layers
of its cost per step: on a CPU the difference between minutes and hours for SmolLM2-135M.
"""
from __future__ import annotations

import jax
import numpy as np

from w2s_jax.models.llama import LlamaConfig


def keep_top_layers(lcfg: LlamaConfig, params: dict, k: int):
    """The model's last k decoder layers (renumbered from 0) and its final norm, as a model of k layers that reads
    `inputs_embeds`: the hidden state after layer N - k. No embedding and no LM head: a classification head reads
    the final norm's output."""
    n = lcfg.num_hidden_layers
    if not 0 < k < n:
        raise ValueError(f"train.trainable_layers={k}: the model has {n} layers; expected 1 .. {n - 1} (0: train "
                         "the whole model)")
    if "layers" in params:
        top = {"layers": jax.tree.map(lambda x: x[n - k:], params["layers"])}
    else:
        top = {f"layers_{i - (n - k)}": params[f"layers_{i}"] for i in range(n - k, n)}
    return lcfg.replace(num_hidden_layers=k), {**top, "norm": params["norm"]}


def with_states(encoded: list[dict], states: list[np.ndarray]) -> list[dict]:
    """Encoded examples that carry their prompt's hidden states, which `batching.collate` pads into the batch's
    `inputs_embeds`."""
    if len(encoded) != len(states):
        raise ValueError(f"{len(encoded)} examples but {len(states)} prompt states")
    return [{**e, "states": s} for e, s in zip(encoded, states)]
