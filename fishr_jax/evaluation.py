"""Accuracy, summaries over restarts, and how results are printed."""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import losses


# The key of an evaluation's draws (MTL's noise), fixed: evaluating the same
# parameters twice gives the same accuracy.
EVAL_KEY = 0

# (params, x, valid, rng) -> logits: Algorithm.logits_fn.
LogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_accuracy_fn(logits_fn: LogitsFn) -> Callable[[Any, dict], jax.Array]:
  """jitted (params, {"x", "y"}) -> mean accuracy on the batch of
  `logits_fn(params, x, valid, rng)` (Algorithm.logits_fn); every row is
  an example."""

  @jax.jit
  def accuracy(params, batch):
    valid = jnp.ones(batch["y"].shape[:1], bool)
    logits = logits_fn(params, batch["x"], valid, jax.random.key(EVAL_KEY))
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
