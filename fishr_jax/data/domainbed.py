"""DomainBed's datasets, in/out splits and batch iterators (SPEC.md, "DomainBed
protocol"; reference: facebookresearch/DomainBed datasets.py, lib/misc.py,
lib/fast_data_loader.py, scripts/train.py).

  dataset = get_dataset("PACS", data_dir)          # environments, sources
  splits = split_environments(dataset, 0.2, trial_seed)   # (in, out) per env
  train = train_batches(dataset, splits, train_envs, batch_size, seed)
  evals = eval_batches(dataset, splits, 64)        # "env0_in" -> fresh pass

Images are channels last (H, W, C), float32. ColoredMNIST and RotatedMNIST
are built in memory from a digit source of `fishr_jax.data.mnist`; the folder
datasets are decoded with Pillow by `image_folder.ImageFolderSource`.
"""

import dataclasses
import hashlib
import os
from typing import Callable, Iterator, NamedTuple, Sequence

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
  """A DomainBed dataset: one random-access source per environment."""
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


class FolderLayout(NamedTuple):
  folder: str  # under data_dir
  environments: tuple[str, ...]  # DomainBed's names
  domains: tuple[str, ...]  # the domain folders, same order


# DomainBed's environment order is its sorted list of domain folders.
FOLDER_DATASETS = {
    "VLCS": FolderLayout("VLCS", ("C", "L", "S", "V"),
                         ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "PACS": FolderLayout("PACS", ("A", "C", "P", "S"),
                         ("art_painting", "cartoon", "photo", "sketch")),
    "OfficeHome": FolderLayout("office_home", ("A", "C", "P", "R"),
                               ("Art", "Clipart", "Product", "Real World")),
    "TerraIncognita": FolderLayout(
        "terra_incognita", ("L100", "L38", "L43", "L46"),
        ("location_100", "location_38", "location_43", "location_46")),
    "DomainNet": FolderLayout(
        "domain_net", ("clip", "info", "paint", "quick", "real", "sketch"),
        ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
}
COLORED_MNIST_ENVIRONMENTS = ("+90%", "+80%", "-90%")
COLOR_FLIP_PROBS = (0.1, 0.2, 0.9)
LABEL_NOISE = 0.25
ROTATED_MNIST_ENVIRONMENTS = ("0", "15", "30", "45", "60", "75")
DATASETS = ("ColoredMNIST", "RotatedMNIST") + tuple(FOLDER_DATASETS)
# Environment names of every dataset, without loading it.
ENVIRONMENTS = {"ColoredMNIST": COLORED_MNIST_ENVIRONMENTS,
                "RotatedMNIST": ROTATED_MNIST_ENVIRONMENTS,
                **{name: layout.environments for name, layout in FOLDER_DATASETS.items()}}
CHECKPOINT_FREQ = {"ColoredMNIST": 100, "RotatedMNIST": 100, "VLCS": 300,
                   "PACS": 300, "OfficeHome": 300, "TerraIncognita": 300,
                   "DomainNet": 1000}

# Leading words of the per-step seeds: they keep the sampling and the
# augmentation streams apart (numpy's SeedSequence pads with zeros, so seeds
# differing only by trailing zeros would otherwise collide).
_SAMPLING_STREAM = 1
_AUGMENTATION_STREAM = 2
# "Infinite" for the step range of train_batches.
_MAX_STEPS = 2**62
_IDX_TEST_FILES = {"images": "t10k-images-idx3-ubyte",
                   "labels": "t10k-labels-idx1-ubyte"}


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
    images.append(mnist.read_idx(paths["images"]))
    digits.append(mnist.read_idx(paths["labels"]))
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


def _rotated_mnist(images: np.ndarray, digits: np.ndarray) -> list[ArraySource]:
  num_envs = len(ROTATED_MNIST_ENVIRONMENTS)
  sources = []
  for env, angle in enumerate(ROTATED_MNIST_ENVIRONMENTS):
    rotated = rotate_digits(images[env::num_envs], float(angle))
    sources.append(ArraySource(rotated[..., None],
                               digits[env::num_envs].astype(np.int32)))
  return sources


def _mnist_dataset(name: str, data_dir: str, digits_source: str,
                   seed: int) -> Dataset:
  images, digits = load_all_digits(digits_source, data_dir or None)
  # DomainBed shuffles with the global torch seed (its --seed) and then draws
  # ColoredMNIST's label noise and colors from the same stream.
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(digits))
  images, digits = images[perm], digits[perm]
  if name == "ColoredMNIST":
    return Dataset(name, list(COLORED_MNIST_ENVIRONMENTS), 2, (28, 28, 2),
                   False, _colored_mnist(images, digits, rng),
                   CHECKPOINT_FREQ[name])
  return Dataset(name, list(ROTATED_MNIST_ENVIRONMENTS), 10, (28, 28, 1),
                 False, _rotated_mnist(images, digits), CHECKPOINT_FREQ[name])


# ----------------------------------------------------------- image folders ---

def _folder_dataset(name: str, data_dir: str, image_size: int) -> Dataset:
  layout = FOLDER_DATASETS[name]
  if not data_dir:
    raise errors.ConfigError(f"{name} needs data_dir: the folder holding "
                             f"{layout.folder}/ (DomainBed's --data_dir).")
  root = os.path.join(data_dir, layout.folder)
  domain_dirs = [os.path.join(root, domain) for domain in layout.domains]
  missing = [d for d in domain_dirs if not os.path.isdir(d)]
  if missing:
    where = (f"there is no {root}" if not os.path.isdir(root)
             else f"{root} lacks {len(missing)} of them")
    raise errors.DataError(
        f"{name} expects DomainBed's layout <data_dir>/{layout.folder}/"
        f"<domain>/<class>/<image> with the domain folders "
        f"{', '.join(domain_dirs)}; {where}: missing {', '.join(missing)}. "
        "(domainbed/scripts/download.py makes this layout.)")
  # DomainBed lets each domain number its own class folders; the sorted union
  # is the same when every domain has every class, and stays consistent when
  # one does not.
  classes = sorted(set().union(*(image_folder.find_classes(d)
                                 for d in domain_dirs)))
  sources = [image_folder.ImageFolderSource(d, classes, image_size)
             for d in domain_dirs]
  return Dataset(name, list(layout.environments), len(classes),
                 (image_size, image_size, 3), True, sources,
                 CHECKPOINT_FREQ[name])


def get_dataset(name: str, data_dir: str = "", digits_source: str = "embedded",
                image_size: int = 224, seed: int = 0) -> Dataset:
  """The dataset `name` (one of DATASETS).

  data_dir: for the folder datasets, the folder holding DomainBed's dataset
    folders (PACS/, VLCS/, office_home/, terra_incognita/, domain_net/); for
    the MNIST ones, the digit source's folder (see fishr_jax.data.mnist).
  digits_source: 'embedded', 'tfds' or 'idx' (MNIST datasets only).
  image_size: output side of the folder datasets' transforms.
  seed: the MNIST datasets' shuffle and ColoredMNIST's noise and colors
    (DomainBed draws them from its --seed).
  """
  if name in ("ColoredMNIST", "RotatedMNIST"):
    return _mnist_dataset(name, data_dir, digits_source, seed)
  if name in FOLDER_DATASETS:
    return _folder_dataset(name, data_dir, image_size)
  raise errors.ConfigError(
      f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}.")


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
