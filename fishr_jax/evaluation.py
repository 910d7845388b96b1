"""Accuracy, summaries over restarts, and how results are printed."""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from fishr_jax import losses


def make_accuracy_fn(model: nn.Module) -> Callable[[Any, dict], jax.Array]:
  """jitted (params, {"x", "y"}) -> mean accuracy of `model` on the batch."""

  @jax.jit
  def accuracy(params, batch):
    _, logits = model.apply({"params": params}, batch["x"])
    return losses.correct(logits, batch["y"]).mean()

  return accuracy


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """Mean and population std (np.std, as the official script) over runs."""
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "std": float(np.std(values)),
          "values": values}


def format_results(results: dict[str, Any]) -> str:
  accs = "  ".join(
      f"{k} {results[k]['mean']:.3f} ± {results[k]['std']:.3f}"
      for k in ("train_acc", "test_acc", "gray_acc"))
  return f"{results['algorithm']} ({results['restarts']} restarts): {accs}"
