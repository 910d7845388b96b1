"""DomainBed's datasets, in/out splits and batch iterators (reference:
facebookresearch/DomainBed datasets.py, lib/misc.py, lib/fast_data_loader.py,
scripts/train.py).

  dataset = get_dataset("PACS", data_dir)          # environments, sources
  splits = split_environments(dataset, 0.2, trial_seed)   # (in, out) per env
  train = train_batches(dataset, splits, train_envs, batch_size, seed)
  evals = eval_batches(dataset, splits, 64)        # "env0_in" -> fresh pass

Everything about a dataset is its `DatasetSpec` in `DATASETS`: the config
checks, hparams, sweeps, model selection and the choice of network read it
there, so a new dataset is one entry (docs/recipes/add_a_dataset.md).

Images are channels last (H, W, C), float32. ColoredMNIST and RotatedMNIST
are built in memory from a digit source of `fishr_jax.data.mnist`; the folder
datasets are decoded with Pillow by `image_folder.ImageFolderSource`.
"""

import dataclasses
import hashlib
import math
import os
import typing
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

from grain import python as grain
import numpy as np
from PIL import Image

from fishr_jax import errors
from fishr_jax.data import image_folder
from fishr_jax.data import mnist

Batch = dict[str, np.ndarray]
Splits = list[tuple[np.ndarray, np.ndarray]]


class ArraySource:
  """An in-memory environment: uint8 images (N, H, W, C) served as float32 in
  [0, 1] (as ToTensor: value / 255), int32 labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> Batch:
    return {"x": self.images[index].astype(np.float32) / 255.0,
            "y": self.labels[index]}

  def get_batch(self, indices: np.ndarray) -> Batch:
    return {"x": self.images[indices].astype(np.float32) / 255.0,
            "y": self.labels[indices]}


Source = ArraySource | image_folder.ImageFolderSource


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A DomainBed dataset, as its DatasetSpec loads it: one random-access
  source per environment."""
  name: str
  environments: list[str]
  num_classes: int
  input_shape: tuple[int, int, int]  # (H, W, C)
  is_image_folder: bool
  sources: list[Source]
  checkpoint_freq: int  # DomainBed's default for this dataset

  def __len__(self) -> int:
    return len(self.sources)

  def __getitem__(self, env: int) -> Source:
    return self.sources[env]


# DomainBed's ColoredMNIST: its environments' color flip probabilities and
# label noise; RotatedMNIST: its environments' angles, in degrees.
COLOR_FLIP_PROBS = (0.1, 0.2, 0.9)
LABEL_NOISE = 0.25
ROTATION_ANGLES = (0, 15, 30, 45, 60, 75)

# Leading words of the per-step seeds: they keep the sampling and the
# augmentation streams apart (numpy's SeedSequence pads with zeros, so seeds
# differing only by trailing zeros would otherwise collide).
_SAMPLING_STREAM = 1
_AUGMENTATION_STREAM = 2
# "Infinite" for the step range of train_batches.
_MAX_STEPS = 2**62
_IDX_TEST_FILES = {"images": "t10k-images-idx3-ubyte",
                   "labels": "t10k-labels-idx1-ubyte"}


# ------------------------------------------------------------------ specs ---

Backbone = Literal["mnist_cnn", "resnet"]
BACKBONES: tuple[str, ...] = typing.get_args(Backbone)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
  """A run's choices about its data: get_dataset's arguments."""
  data_dir: str
  digits_source: str
  image_size: int
  seed: int


class LoadedEnvironments(NamedTuple):
  sources: list[Source]  # one per environment, in the spec's order
  num_classes: int
  input_shape: tuple[int, int, int]  # (H, W, C)


@dataclasses.dataclass(frozen=True)
class MNISTDigits:
  """Environments made in memory from MNIST's digits (DomainBed's
  MultipleEnvironmentMNIST): every digit of options.digits_source, shuffled
  by options.seed, goes to make_environments(images, digits, rng), `rng`
  being the generator that shuffled them (DomainBed draws ColoredMNIST's
  noise and colors from that stream)."""
  num_classes: int
  input_shape: tuple[int, int, int]  # (H, W, C)
  make_environments: Callable[
      [np.ndarray, np.ndarray, np.random.Generator], list[ArraySource]]

  def load(self, name: str, options: LoadOptions) -> LoadedEnvironments:
    del name  # the digits' errors name their files
    images, digits = load_all_digits(options.digits_source,
                                     options.data_dir or None)
    rng = np.random.default_rng(options.seed)
    perm = rng.permutation(len(digits))
    return LoadedEnvironments(
        self.make_environments(images[perm], digits[perm], rng),
        self.num_classes, self.input_shape)


@dataclasses.dataclass(frozen=True)
class InMemory:
  """Environments made in memory by make_environments(options) from
  anything but MNIST's digits, so a run refuses config.digits_source."""
  num_classes: int
  input_shape: tuple[int, int, int]  # (H, W, C)
  make_environments: Callable[[LoadOptions], list[ArraySource]]

  def load(self, name: str, options: LoadOptions) -> LoadedEnvironments:
    del name
    return LoadedEnvironments(self.make_environments(options),
                              self.num_classes, self.input_shape)


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """DomainBed's folders, <data_dir>/<folder>/<domain>/<class>/<image>: one
  domain folder per environment, one class per class folder; images are
  resized to options.image_size and augmented in training."""
  folder: str  # under data_dir
  domains: tuple[str, ...]  # the domain folders, in environment order

  def load(self, name: str, options: LoadOptions) -> LoadedEnvironments:
    if not options.data_dir:
      raise errors.ConfigError(f"{name} needs data_dir: the folder holding "
                               f"{self.folder}/ (DomainBed's --data_dir).")
    root = os.path.join(options.data_dir, self.folder)
    domain_dirs = [os.path.join(root, domain) for domain in self.domains]
    missing = [d for d in domain_dirs if not os.path.isdir(d)]
    if missing:
      where = (f"there is no {root}" if not os.path.isdir(root)
               else f"{root} lacks {len(missing)} of them")
      raise errors.DataError(
          f"{name} expects DomainBed's layout <data_dir>/{self.folder}/"
          f"<domain>/<class>/<image> with the domain folders "
          f"{', '.join(domain_dirs)}; {where}: missing {', '.join(missing)}. "
          "(domainbed/scripts/download.py makes this layout.)")
    # DomainBed lets each domain number its own class folders; the sorted
    # union is the same when every domain has every class, and stays
    # consistent when one does not.
    classes = sorted(set().union(*(image_folder.find_classes(d)
                                   for d in domain_dirs)))
    sources = [image_folder.ImageFolderSource(d, classes, options.image_size)
               for d in domain_dirs]
    return LoadedEnvironments(sources, len(classes),
                              (options.image_size, options.image_size, 3))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything about one dataset; the config checks, hparams, sweeps, model
  selection and the network read it here."""
  name: str
  environments: tuple[str, ...]  # DomainBed's names: the tables' columns
  # How the environments are made, which decides the config fields the
  # dataset reads: digits_source (MNISTDigits), image_size (FolderLayout).
  data: MNISTDigits | InMemory | FolderLayout
  # "mnist_cnn": models.MNISTCNN; "resnet": resnet.ResNet (ResNet-18 or 50
  # by hparams), which alone reads config.pretrained_checkpoint.
  backbone: Backbone
  # DomainBed's SMALL_IMAGES hparam ranges (lr, weight decay, batch size).
  small_images: bool
  checkpoint_freq: int  # DomainBed's default steps between evaluations
  # The random search's batch sizes are int(2**uniform(3, this)); None:
  # DomainBed's bound for the image size (hparams.py).
  batch_size_log2_high: float | None = None

  def __post_init__(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"Dataset {self.name!r}: backbone {self.backbone!r} "
                       f"is not one of {', '.join(BACKBONES)}.")
    if (isinstance(self.data, FolderLayout)
        and len(self.data.domains) != len(self.environments)):
      raise ValueError(f"Dataset {self.name!r}: {len(self.data.domains)} "
                       f"domain folders for {len(self.environments)} "
                       "environments.")

  @property
  def reads_digits(self) -> bool:
    return isinstance(self.data, MNISTDigits)

  @property
  def is_image_folder(self) -> bool:
    return isinstance(self.data, FolderLayout)

  def load(self, options: LoadOptions) -> Dataset:
    loaded = self.data.load(self.name, options)
    if len(loaded.sources) != len(self.environments):
      raise ValueError(
          f"Dataset {self.name!r} made {len(loaded.sources)} environments "
          f"for its {len(self.environments)} names.")
    return Dataset(self.name, list(self.environments), loaded.num_classes,
                   loaded.input_shape, self.is_image_folder, loaded.sources,
                   self.checkpoint_freq)


# ----------------------------------------------------------------- digits ---

def _find_idx_file(folder: str, stem: str) -> str | None:
  for name in (stem, stem + ".gz"):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def _idx_folder(data_dir: str) -> str:
  """data_dir itself, or DomainBed's torchvision layout <data_dir>/MNIST/raw."""
  for folder in (data_dir, os.path.join(data_dir, "MNIST", "raw")):
    if _find_idx_file(folder, mnist.IDX_FILES["images"]):
      return folder
  return data_dir  # mnist.py then names the missing file


def load_all_digits(
    source: str = "embedded",
    data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images (N, 28, 28) and int64 digits (N,): MNIST's training then test
  digits, concatenated as DomainBed does (all 70,000 for tfds and idx, which
  then also needs the t10k files); 'embedded' gives its 5,000 digits."""
  if source == "idx" and data_dir:
    data_dir = _idx_folder(data_dir)
  pools = mnist.load_digit_pools(source, data_dir)
  # The pools split the training set; rejoined, they are that set in order.
  images = [pools.train_images, pools.test_images]
  digits = [pools.train_digits, pools.test_digits]
  if source == "idx":
    paths = {key: _find_idx_file(data_dir, stem)
             for key, stem in _IDX_TEST_FILES.items()}
    if None in paths.values():
      raise errors.DataError(
          "DomainBed's MNIST datasets use MNIST's training and test digits; "
          f"expected {os.path.join(data_dir, _IDX_TEST_FILES['images'])}[.gz] "
          f"and {os.path.join(data_dir, _IDX_TEST_FILES['labels'])}[.gz].")
    test_images = mnist.read_idx(paths["images"])
    test_digits = mnist.read_idx(paths["labels"])
    mnist.check_digits(paths["images"], test_images, paths["labels"],
                       test_digits)
    images.append(test_images)
    digits.append(test_digits)
  elif source == "tfds":
    # load_digit_pools has checked that TensorFlow is there.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    test = tfds.load("mnist", split="test", as_supervised=True,
                     data_dir=data_dir or None)
    test_images, test_digits = next(iter(tfds.as_numpy(test.batch(len(test)))))
    images.append(test_images)
    digits.append(test_digits)
  return (np.concatenate([np.asarray(a, np.uint8).reshape(-1, 28, 28)
                          for a in images]),
          np.concatenate([np.asarray(d, np.int64).reshape(-1) for d in digits]))


def rotate_digits(images: np.ndarray, angle: float) -> np.ndarray:
  """uint8 (N, 28, 28) rotated counterclockwise by `angle` degrees about the
  center, bilinear, zero fill: torchvision's rotate(img, angle, fill=(0,),
  interpolation=BILINEAR) on the Pillow image, which is Pillow's rotate."""
  rotated = np.empty_like(images)
  for i, image in enumerate(images):
    rotated[i] = np.asarray(Image.fromarray(image, "L").rotate(
        angle, resample=Image.Resampling.BILINEAR, fillcolor=0))
  return rotated


def _colored_mnist(images: np.ndarray, digits: np.ndarray,
                   rng: np.random.Generator) -> list[ArraySource]:
  sources = []
  num_envs = len(COLOR_FLIP_PROBS)
  for env, flip_prob in enumerate(COLOR_FLIP_PROBS):
    env_images, env_digits = images[env::num_envs], digits[env::num_envs]
    n = len(env_digits)
    labels = (env_digits < 5) ^ (rng.random(n) < LABEL_NOISE)
    colors = labels ^ (rng.random(n) < flip_prob)
    x = np.stack([env_images, env_images], axis=-1)
    # The image goes in the channel of its color: zero the other one.
    x[np.arange(n), :, :, 1 - colors.astype(np.int64)] = 0
    sources.append(ArraySource(x, labels.astype(np.int32)))
  return sources


def _rotated_mnist(images: np.ndarray, digits: np.ndarray,
                   rng: np.random.Generator) -> list[ArraySource]:
  del rng  # the shuffle is all the randomness
  num_envs = len(ROTATION_ANGLES)
  sources = []
  for env, angle in enumerate(ROTATION_ANGLES):
    rotated = rotate_digits(images[env::num_envs], float(angle))
    sources.append(ArraySource(rotated[..., None],
                               digits[env::num_envs].astype(np.int32)))
  return sources


# ---------------------------------------------------------------- registry ---

# The datasets, in DomainBed's table order (domainbed/datasets.py DATASETS).
# A folder dataset's environments are DomainBed's sorted domain folders.
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("ColoredMNIST", ("+90%", "+80%", "-90%"),
                MNISTDigits(2, (28, 28, 2), _colored_mnist),
                backbone="mnist_cnn", small_images=True, checkpoint_freq=100),
    DatasetSpec("RotatedMNIST", tuple(str(a) for a in ROTATION_ANGLES),
                MNISTDigits(10, (28, 28, 1), _rotated_mnist),
                backbone="mnist_cnn", small_images=True, checkpoint_freq=100),
    DatasetSpec("VLCS", ("C", "L", "S", "V"),
                FolderLayout("VLCS", ("Caltech101", "LabelMe", "SUN09",
                                      "VOC2007")),
                backbone="resnet", small_images=False, checkpoint_freq=300),
    DatasetSpec("PACS", ("A", "C", "P", "S"),
                FolderLayout("PACS", ("art_painting", "cartoon", "photo",
                                      "sketch")),
                backbone="resnet", small_images=False, checkpoint_freq=300),
    DatasetSpec("OfficeHome", ("A", "C", "P", "R"),
                FolderLayout("office_home", ("Art", "Clipart", "Product",
                                             "Real World")),
                backbone="resnet", small_images=False, checkpoint_freq=300),
    DatasetSpec("TerraIncognita", ("L100", "L38", "L43", "L46"),
                FolderLayout("terra_incognita", (
                    "location_100", "location_38", "location_43",
                    "location_46")),
                backbone="resnet", small_images=False, checkpoint_freq=300),
    DatasetSpec("DomainNet",
                ("clip", "info", "paint", "quick", "real", "sketch"),
                FolderLayout("domain_net", (
                    "clipart", "infograph", "painting", "quickdraw", "real",
                    "sketch")),
                backbone="resnet", small_images=False, checkpoint_freq=1000,
                batch_size_log2_high=5.0),
)}


def dataset_spec(name: str) -> DatasetSpec:
  """DATASETS[name]; an unknown name is a ConfigError listing the known."""
  if name not in DATASETS:
    raise errors.ConfigError(
        f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}.")
  return DATASETS[name]


def get_dataset(name: str, data_dir: str = "", digits_source: str = "embedded",
                image_size: int = 224, seed: int = 0) -> Dataset:
  """The dataset `name` (a key of DATASETS).

  data_dir: for the folder datasets, the folder holding DomainBed's dataset
    folders (PACS/, VLCS/, office_home/, terra_incognita/, domain_net/); for
    the MNIST ones, the digit source's folder (see fishr_jax.data.mnist).
  digits_source: 'embedded', 'tfds' or 'idx' (MNIST datasets only).
  image_size: output side of the folder datasets' transforms.
  seed: the MNIST datasets' shuffle and ColoredMNIST's noise and colors
    (DomainBed draws them from its --seed).
  """
  return dataset_spec(name).load(
      LoadOptions(data_dir, digits_source, image_size, seed))


# ----------------------------------------------------------------- splits ---

def seed_hash(*args) -> int:
  """DomainBed's misc.seed_hash: md5 of str(args), mod 2**31."""
  digest = hashlib.md5(str(args).encode("utf-8")).hexdigest()
  return int(digest, 16) % (2**31)


def split_indices(n: int, n_first: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """DomainBed's misc.split_dataset on range(n): keys shuffled by
  RandomState(seed), then (the first n_first keys, the rest)."""
  if not 0 <= n_first <= n:
    raise ValueError(f"Cannot take {n_first} of {n} examples.")
  keys = np.arange(n)
  # Same permutation as RandomState(seed).shuffle on DomainBed's list.
  np.random.RandomState(seed).shuffle(keys)
  return keys[:n_first], keys[n_first:]


def split_environments(dataset: Dataset, holdout_fraction: float,
                       trial_seed: int) -> Splits:
  """Per environment (in_indices, out_indices): `out` holds
  int(len(env) * holdout_fraction) examples, chosen as train.py does:
  out, in = split_dataset(env, n_out, seed_hash(trial_seed, env_i))."""
  splits = []
  for env, source in enumerate(dataset.sources):
    num_out = int(len(source) * holdout_fraction)
    out_indices, in_indices = split_indices(
        len(source), num_out, seed_hash(int(trial_seed), env))
    splits.append((in_indices, out_indices))
  return splits


def check_splits(dataset: Dataset, splits: Splits,
                 holdout_fraction: float) -> None:
  """errors.DataError, naming the environment (and its folder), unless
  every in and out split is non-empty: an empty split's accuracy is no
  number, and read as 0 it would feed model selection a wrong run."""
  for env, (source, (in_indices, out_indices)) in enumerate(
      zip(dataset.sources, splits)):
    n = len(source)
    where = f"{dataset.name} env {env} ({dataset.environments[env]}"
    where += (f", {source.domain_dir})"
              if isinstance(source, image_folder.ImageFolderSource) else ")")
    if len(out_indices) == 0:
      at_least = math.ceil(1000 / n) / 1000  # int(n * h) >= 1, rounded up
      raise errors.DataError(
          f"{where} has {n} examples, and holdout_fraction={holdout_fraction}"
          f" holds out int({n} * {holdout_fraction}) = 0 of them, so its "
          f"validation split env{env}_out would be empty. Set "
          f"--config.holdout_fraction={at_least} or more, or add examples.")
    if len(in_indices) == 0:
      raise errors.DataError(
          f"{where} has {n} examples, and holdout_fraction={holdout_fraction}"
          f" holds out all of them, so its split env{env}_in would be empty. "
          "Lower --config.holdout_fraction, or add examples.")


# ---------------------------------------------------------------- batches ---

def _gather(source: Source, indices: np.ndarray,
            rngs: Sequence[np.random.Generator] | None = None) -> Batch:
  """{"x": float32 (n, H, W, C), "y": int32 (n,)} of source[indices],
  augmented with one rng per example when `rngs` is given."""
  if isinstance(source, ArraySource):
    return source.get_batch(indices)
  if rngs is None:
    examples = [source.load(int(i)) for i in indices]
  else:
    examples = [source.load(int(i), rng) for i, rng in zip(indices, rngs)]
  return {"x": np.stack([e["x"] for e in examples]),
          "y": np.asarray([e["y"] for e in examples], np.int32)}


def diagnostics_batch(dataset: Dataset, splits: Splits,
                      train_envs: Sequence[int], examples: int) -> Batch:
  """The fixed examples the landscape diagnostics measure: the first
  `examples` of each training env's in split (shuffled by the trial seed),
  not augmented; {"x", "y", "domain"} as train_batches's."""
  parts = []
  for position, env in enumerate(train_envs):
    chosen = splits[env][0][:examples]
    parts.append({**_gather(dataset[env], chosen),
                  "domain": np.full(len(chosen), position, np.int32)})
  return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _iterate(batches: grain.MapDataset, worker_count: int) -> Iterator[Batch]:
  """The batches in order; with worker_count > 0, grain computes up to that
  many ahead in as many threads (Pillow and numpy release the GIL)."""
  if worker_count <= 0:
    for i in range(len(batches)):
      yield batches[i]
  else:
    options = grain.ReadOptions(num_threads=worker_count,
                                prefetch_buffer_size=worker_count)
    yield from batches.to_iter_dataset(options)


def train_batches(dataset: Dataset, splits: Splits, train_envs: Sequence[int],
                  batch_size: int, seed: int, start_step: int = 0,
                  augment: bool = False, *, worker_count: int = 0,
                  process_shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
  """Infinite training batches, one per step from `start_step` on.

  Step k: for each env of `train_envs`, in that order, `batch_size` examples
  drawn uniformly with replacement from its in split (DomainBed's
  InfiniteDataLoader), concatenated: {"x": float32 (E*B, H, W, C),
  "y": int32 (E*B,), "domain": int32 (E*B,), the position in train_envs}.
  Step k depends only on (seed, k), so start_step=k resumes exactly.
  `augment` applies DomainBed's augmentation to the folder datasets (the MNIST
  ones have none); `worker_count` threads decode ahead (0: in the caller).
  `process_shard=(i, p)`: process i of a p-process job loads only its part,
  the i-th of p equal slices of every env's examples (same draws).
  """
  train_envs = [int(e) for e in train_envs]
  if not train_envs:
    raise ValueError("train_batches needs at least one training environment.")
  for env in train_envs:
    if not 0 <= env < len(dataset.sources):
      raise ValueError(f"Training env {env} out of range: {dataset.name} has "
                       f"{len(dataset.sources)} environments.")
    if len(splits[env][0]) == 0:
      raise ValueError(f"The in split of env {env} is empty.")
  if batch_size <= 0 or seed < 0 or start_step < 0:
    raise ValueError("batch_size must be positive, seed and start_step >= 0; "
                     f"got {batch_size}, {seed}, {start_step}.")
  augment = augment and dataset.is_image_folder
  shard_index, shard_count = process_shard
  if batch_size % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(f"process_shard={process_shard} must split the batch size "
                     f"{batch_size} per env evenly.")
  mine = slice(shard_index * batch_size // shard_count,
               (shard_index + 1) * batch_size // shard_count)
  domains = np.repeat(np.arange(len(train_envs), dtype=np.int32),
                      batch_size // shard_count)

  def make_batch(step: int) -> Batch:
    rng = np.random.default_rng([_SAMPLING_STREAM, seed, step])
    parts = []
    for position, env in enumerate(train_envs):
      in_indices = splits[env][0]
      chosen = in_indices[rng.integers(0, len(in_indices), batch_size)][mine]
      rngs = None
      if augment:
        # One stream per example, so threads need not share a generator.
        rngs = [np.random.default_rng(
            [_AUGMENTATION_STREAM, seed, step, position, b])
                for b in range(batch_size)[mine]]
      parts.append(_gather(dataset.sources[env], chosen, rngs))
    return {"x": np.concatenate([p["x"] for p in parts]),
            "y": np.concatenate([p["y"] for p in parts]),
            "domain": domains.copy()}

  steps = grain.MapDataset.range(start_step, _MAX_STEPS).map(make_batch)
  return _iterate(steps, worker_count)


def eval_batches(
    dataset: Dataset, splits: Splits, batch_size: int, *,
    worker_count: int = 0) -> dict[str, Callable[[], Iterator[Batch]]]:
  """For every env i, "env{i}_in" and "env{i}_out" (all ins first, as
  train.py names its eval loaders): a function giving a fresh pass over that
  split in split order, without augmentation, as {"x", "y"} batches of
  `batch_size` (the last one may be smaller)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")

  def make_pass(source: Source,
                indices: np.ndarray) -> Callable[[], Iterator[Batch]]:
    num_batches = -(-len(indices) // batch_size)
    batches = grain.MapDataset.range(num_batches).map(
        lambda b: _gather(source, indices[b * batch_size:(b + 1) * batch_size]))
    return lambda: _iterate(batches, worker_count)

  passes = {}
  for part, name in ((0, "in"), (1, "out")):
    for env, source in enumerate(dataset.sources):
      passes[f"env{env}_{name}"] = make_pass(source, splits[env][part])
  return passes
