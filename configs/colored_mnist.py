"""Colored MNIST, IRM setup (Arjovsky et al., 2019; Fishr paper, Table 2).

`restarts` full-batch runs of an MLP on two training environments whose
color agrees with the label 80 % and 90 % of the time, evaluated on a test
environment where it agrees 10 % of the time and on gray images. The
default preset is a small-data setting for the 5,000 embedded digits
(hidden 128, anneal 100, 301 steps, 5 restarts; nothing is downloaded):

  python -m fishr_jax.main --config configs/colored_mnist.py --workdir runs/cmnist

Each restart is a run in runs/cmnist/restart_<r>/; runs/cmnist/results.json
summarizes them. The preset "paper" has the paper's flags (hidden 390,
anneal 190, 501 steps, 10 restarts) and is meant for full MNIST
(data.source=tfds or idx):

  python -m fishr_jax.main --config configs/colored_mnist.py:paper \\
      --config.data.source=tfds --workdir runs/cmnist_paper

Every field can be overridden, e.g. --config.algorithm=erm|irm|vrex|fishr|
coral|mmd|groupdro|mixup (every registered algorithm has a block here),
--config.restarts=10, --config.steps=501, --config.hidden_dim=390,
--config.seed=1, --config.data.source=embedded|tfds|idx,
--config.data.data_dir=DIR, --config.fishr.lambda_=1000.

Fields: docs/configs.md. Semantics: docs/official_semantics.md. Measured
results, with their commands and commits: README.md ("Results") and
results/colored_mnist_embedded.md.
"""

import ml_collections

from fishr_jax import config_fields as common

# The IRM authors' tuned values; the official Fishr script uses them for every
# algorithm (github facebookresearch/InvariantRiskMinimization).
LR = 0.0004898536566546834
L2_REGULARIZER_WEIGHT = 0.00110794568
PENALTY_WEIGHT = 91257.18613115903


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  """preset: "" (embedded digits, small-data preset) or "paper"."""
  config = ml_collections.ConfigDict()
  config.algorithm = "fishr"
  config.seed = 0
  config.restarts = 5
  # Restarts trained together as a group (0: all of them): one vectorized
  # program, or on CPU each restart's step in turn (group_step); each still
  # has its own folder, records and checkpoints, as if trained alone.
  config.runs_per_program = 0
  config.steps = 301
  config.hidden_dim = 128
  config.log_every = 50  # steps between records (and printed lines)
  config.checkpoint_every = 100  # a multiple of log_every
  common.add_diagnostics_fields(config)
  common.add_device_fields(config)

  # Optimizer: Adam, explicit L2 in the loss (biases included, not halved),
  # coupled weight decay off.
  common.add_optimizer_field(config)
  config.lr = LR
  config.weight_decay = 0.0

  # The schedule of the IRM script (algorithms/base.py, Schedule): weight 1.0
  # before the anneal step, lambda_ from it on, the whole loss divided by the
  # weight when > 1, and no optimizer reset.
  config.penalty_anneal_iters = 100
  config.penalty_warmup_weight = 1.0
  config.rescale_loss = True
  config.reset_optimizer_at_anneal = False
  config.l2_regularizer_weight = L2_REGULARIZER_WEIGHT

  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded"
  config.data.data_dir = ""
  config.data.label_noise = 0.25
  config.data.train_color_flip_probs = (0.2, 0.1)
  config.data.test_color_flip_prob = 0.9

  # Every registered algorithm, with its Config's defaults (DomainBed's)
  # except where the IRM-setup script differs.
  common.add_algorithm_blocks(config, overrides={
      "irm": {"lambda_": PENALTY_WEIGHT, "split_halves": False},
      "vrex": {"lambda_": PENALTY_WEIGHT, "reduction": "pairwise"},
      "fishr": {"lambda_": PENALTY_WEIGHT, "ema": 0.0, "reduction": "sum",
                "moment_sums": "auto"},
      # Two training domains: one meta-train, one meta-test.
      "mldg": {"n_meta_test": 1},
  })

  if preset == "paper":
    config.restarts = 10
    config.steps = 501
    config.hidden_dim = 390
    config.penalty_anneal_iters = 190
    config.log_every = 100
  elif preset:
    raise ValueError(f"Unknown preset {preset!r}; use '' or 'paper'.")
  return config
