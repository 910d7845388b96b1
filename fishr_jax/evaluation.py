"""Accuracy, summaries over restarts, and how results are printed."""

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import losses


# The key of an evaluation's draws (MTL's noise), fixed: evaluating the same
# parameters twice gives the same accuracy.
EVAL_KEY = 0

# (params, x, valid, rng) -> logits: Algorithm.logits_fn.
LogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def padded_length(n: int) -> int:
  """The rows an evaluation batch of `n` examples is zero-padded to: a power
  of two, at least 8, so the jitted forward compiles for a few shapes only."""
  return max(8, 1 << (n - 1).bit_length())


def make_accuracy_fn(logits_fn: LogitsFn, pad: bool = True
                     ) -> Callable[[Any, Iterable[dict]], float]:
  """(params, batches) -> the accuracy over all `batches` ({"x", "y"}, an
  example per row) of `logits_fn(params, x, valid, rng)`
  (Algorithm.logits_fn; batch i's rng is fold_in(key(EVAL_KEY), i)).

  `pad`: each batch is zero-padded to `padded_length` rows, which `valid`
  marks, so that a split's batches of any length compile for a few shapes;
  without it (a batch of one fixed size, e.g. a whole Colored MNIST
  environment) each batch's own shape is compiled.
  """

  @jax.jit
  def correct_count(params, x, y, valid, index):
    rng = jax.random.fold_in(jax.random.key(EVAL_KEY), index)
    logits = logits_fn(params, x, valid, rng)
    return jnp.sum(losses.correct(logits, y) * valid)

  def accuracy(params, batches) -> float:
    # The count stays on the device until the end (exact: integers far
    # below 2**24), so the host prepares the next batch while one runs.
    correct, total = jnp.zeros((), jnp.float32), 0
    for index, batch in enumerate(batches):
      n = len(batch["y"])
      x, y = batch["x"], batch["y"]
      if pad:
        rows = padded_length(n) - n
        x = np.pad(x, [(0, rows)] + [(0, 0)] * (np.ndim(x) - 1))
        y = np.pad(y, (0, rows))
      valid = np.arange(len(y)) < n
      correct = correct + correct_count(params, x, y, valid, np.int32(index))
      total += n
    if total == 0:  # domainbed.check_splits refuses empty splits first
      raise ValueError("An accuracy over no examples: the split is empty.")
    return float(correct) / total

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
