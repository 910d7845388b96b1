"""Colored MNIST in the IRM setup (Arjovsky et al., 2019), as in
docs/official_semantics.md ("Colored MNIST (IRM setup)").

label = (digit < 5) flipped with prob. `label_noise`; color = label flipped
with prob. e; images subsampled to 14x14 and put in the channel of their color
(channels last: x is (n, 14, 14, 2), float32 in [0, 1]). The two training
environments (e = 0.2 and 0.1) are the even and odd rows of the reshuffled
train pool; the test environment (e = 0.9) and the gray one (both channels
kept, fresh label noise) come from the test pool.
"""

from typing import NamedTuple

import ml_collections
import numpy as np

from fishr_jax.data import mnist

Batch = dict[str, np.ndarray]


class Environments(NamedTuple):
  train: Batch  # every training env concatenated, with "domain" ids
  evals: dict[str, Batch]  # name -> {"x", "y"}


def make_environment(images: np.ndarray, digits: np.ndarray,
                     color_flip_prob: float, rng: np.random.Generator,
                     label_noise: float = 0.25,
                     grayscale: bool = False) -> Batch:
  """One environment: {"x": (n, 14, 14, 2) float32, "y": (n,) float32}."""
  labels = (digits < 5).astype(np.float32)
  labels = np.abs(labels - (rng.random(len(labels)) < label_noise))
  colors = np.abs(labels - (rng.random(len(labels)) < color_flip_prob))
  images = images.reshape(-1, 28, 28)[:, ::2, ::2].astype(np.float32) / 255.0
  x = np.stack([images, images], axis=-1)
  if not grayscale:
    x[np.arange(len(x)), :, :, (1 - colors).astype(np.int64)] = 0.0
  return {"x": x, "y": labels.astype(np.float32)}


def make_environments(pools: mnist.DigitPools, config: ml_collections.ConfigDict,
                      rng: np.random.Generator) -> Environments:
  """The environments of one restart. `rng` reshuffles the train pool and draws
  the label noise and colors; a new restart should get a new `rng`.

  config: label_noise, train_color_flip_probs (one per training env, which
  take interleaved rows of the pool), test_color_flip_prob.
  """
  perm = rng.permutation(len(pools.train_digits))
  images, digits = pools.train_images[perm], pools.train_digits[perm]
  probs = tuple(config.train_color_flip_probs)
  n_envs = len(probs)
  train_envs = [
      make_environment(images[i::n_envs], digits[i::n_envs], p, rng,
                       config.label_noise) for i, p in enumerate(probs)
  ]
  train = {
      "x": np.concatenate([env["x"] for env in train_envs]),
      "y": np.concatenate([env["y"] for env in train_envs]),
      "domain": np.concatenate([
          np.full(len(env["y"]), i, np.int32) for i, env in enumerate(train_envs)
      ]),
  }
  evals = {
      "test": make_environment(pools.test_images, pools.test_digits,
                               config.test_color_flip_prob, rng,
                               config.label_noise),
      "gray": make_environment(pools.test_images, pools.test_digits,
                               config.test_color_flip_prob, rng,
                               config.label_noise, grayscale=True),
  }
  return Environments(train=train, evals=evals)
