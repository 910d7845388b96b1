"""DomainBed's datasets, in/out splits and batch iterators."""

import hashlib
import itertools
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fishr_jax import errors

from fishr_jax.data import domainbed
from fishr_jax.data import image_folder
from tests.conftest import write_idx


@pytest.fixture(scope="module")
def digits():
  return domainbed.load_all_digits("embedded")


@pytest.fixture(scope="module")
def colored():
  return domainbed.get_dataset("ColoredMNIST")


@pytest.fixture(scope="module")
def rotated():
  return domainbed.get_dataset("RotatedMNIST")


def _indexed_dataset(sizes=(50, 40, 30)):
  """Environments whose labels are env * 1000 + index: a batch tells which
  examples it holds. Pixel values encode the label too."""
  sources = []
  for env, n in enumerate(sizes):
    labels = env * 1000 + np.arange(n)
    images = (labels % 251).astype(np.uint8).reshape(n, 1, 1, 1)
    sources.append(domainbed.ArraySource(np.tile(images, (1, 4, 4, 1)), labels))
  return domainbed.Dataset("Indexed", [str(e) for e in range(len(sizes))],
                           3000, (4, 4, 1), False, sources, 100)


def _shuffled_digits(digits, seed=0):
  images, labels = digits
  perm = np.random.default_rng(seed).permutation(len(labels))
  return images[perm], labels[perm]


# ---------------------------------------------------------------- registry ---

def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="PACS.*DomainNet"):
    domainbed.get_dataset("CIFAR10")


def test_mnist_datasets_metadata(colored, rotated):
  assert colored.environments == ["+90%", "+80%", "-90%"]
  assert colored.num_classes == 2 and colored.input_shape == (28, 28, 2)
  assert rotated.environments == ["0", "15", "30", "45", "60", "75"]
  assert rotated.num_classes == 10 and rotated.input_shape == (28, 28, 1)
  for dataset, num_envs in ((colored, 3), (rotated, 6)):
    assert not dataset.is_image_folder
    assert len(dataset) == num_envs
    # Every one of the 5,000 embedded digits, dealt round-robin.
    sizes = [len(source) for source in dataset.sources]
    assert sum(sizes) == 5000 and max(sizes) - min(sizes) <= 1
    example = dataset[0][0]
    assert example["x"].shape == dataset.input_shape
    assert example["x"].dtype == np.float32 and example["y"].dtype == np.int32
    assert 0.0 <= dataset[0].images.min() and dataset[0].images.max() <= 255
    labels = np.concatenate([source.labels for source in dataset.sources])
    assert set(np.unique(labels)) == set(range(dataset.num_classes))


def test_colored_mnist_is_built_like_domainbed(colored, digits):
  images, labels = _shuffled_digits(digits)
  for env, expected in enumerate((0.9, 0.8, 0.1)):
    source = colored[env]
    ink = source.images.astype(np.int64).sum(axis=(1, 2))
    assert np.all((ink[:, 0] == 0) | (ink[:, 1] == 0))  # one channel zeroed
    color = (ink[:, 1] > 0).astype(np.int32)
    assert abs(np.mean(color == source.labels) - expected) < 0.03
    # The digits are rows env::3 of the shuffled source, in their color's
    # channel, and the label is digit < 5 with 25% noise.
    env_images, env_labels = images[env::3], labels[env::3]
    np.testing.assert_array_equal(source.images.max(axis=-1), env_images)
    assert abs(np.mean(source.labels == (env_labels < 5)) - 0.75) < 0.03


def test_colored_mnist_depends_on_seed(colored):
  other = domainbed.get_dataset("ColoredMNIST", seed=1)
  assert not np.array_equal(other[0].labels, colored[0].labels)


def test_rotated_mnist_environments(rotated, digits):
  images, labels = _shuffled_digits(digits)
  # 0 degrees is the digits themselves.
  np.testing.assert_array_equal(rotated[0].images[..., 0], images[0::6])
  for env, angle in enumerate((0, 15, 30, 45, 60, 75)):
    np.testing.assert_array_equal(rotated[env].labels, labels[env::6])
    np.testing.assert_array_equal(
        rotated[env].images[..., 0],
        domainbed.rotate_digits(images[env::6], angle))


def test_rotate_is_counterclockwise_about_the_center(digits):
  images = digits[0][:20]
  # Pillow does exact multiples of 90 degrees by transposition; just off 90,
  # bilinear interpolation must land on the same image up to small errors.
  np.testing.assert_array_equal(domainbed.rotate_digits(images, 90),
                                np.rot90(images, 1, axes=(1, 2)))
  near = domainbed.rotate_digits(images, 89.9).astype(np.float64)
  diff = np.abs(near - np.rot90(images, 1, axes=(1, 2)))
  assert diff.mean() < 1.0 and diff.max() < 40
  # A dot right of the center goes up (counterclockwise, rows grow down).
  dot = np.zeros((1, 28, 28), np.uint8)
  dot[0, 13:15, 20:22] = 255
  rows, cols = np.nonzero(domainbed.rotate_digits(dot, 30)[0] > 64)
  center = 13.5  # between pixels 13 and 14, where Pillow puts it
  angle = np.degrees(np.arctan2(center - rows.mean(), cols.mean() - center))
  assert abs(angle - 30) < 5


def test_idx_digits_are_train_then_test(tmp_path):
  # DomainBed's torchvision layout: <data_dir>/MNIST/raw/<IDX files>.
  raw = tmp_path / "MNIST" / "raw"
  raw.mkdir(parents=True)
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  test = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
  write_idx(str(raw / "train-images-idx3-ubyte"), train)
  write_idx(str(raw / "train-labels-idx1-ubyte"), np.arange(12) % 10)
  write_idx(str(raw / "t10k-images-idx3-ubyte"), test)
  with pytest.raises(errors.DataError, match="t10k-labels-idx1-ubyte"):
    domainbed.load_all_digits("idx", str(tmp_path))
  write_idx(str(raw / "t10k-labels-idx1-ubyte"), np.arange(6))
  images, labels = domainbed.load_all_digits("idx", str(tmp_path))
  np.testing.assert_array_equal(images, np.concatenate([train, test]))
  np.testing.assert_array_equal(labels, np.r_[np.arange(12) % 10, np.arange(6)])
  dataset = domainbed.get_dataset("RotatedMNIST", str(tmp_path), "idx")
  assert sum(len(source) for source in dataset.sources) == 18


# ------------------------------------------------------------------ splits ---

def test_seed_hash_matches_domainbed():
  for args in ((0, 0), (0, 1), (3, 5), (12345, 2)):
    expected = int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16)
    assert domainbed.seed_hash(*args) == expected % (2**31)
  assert 0 <= domainbed.seed_hash(7, 3) < 2**31


def test_split_sizes_and_seeds(colored):
  splits = domainbed.split_environments(colored, 0.2, trial_seed=0)
  assert len(splits) == 3
  for env, (in_indices, out_indices) in enumerate(splits):
    n = len(colored[env])
    assert len(out_indices) == int(n * 0.2)
    assert len(in_indices) == n - int(n * 0.2)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([in_indices, out_indices])), np.arange(n))
    # DomainBed: keys = list(range(n)) shuffled by RandomState(seed_hash),
    # out = the first int(n * holdout) keys, in = the rest.
    keys = list(range(n))
    np.random.RandomState(domainbed.seed_hash(0, env)).shuffle(keys)
    np.testing.assert_array_equal(out_indices, keys[:len(out_indices)])
    np.testing.assert_array_equal(in_indices, keys[len(out_indices):])
  again = domainbed.split_environments(colored, 0.2, trial_seed=np.int64(0))
  other_trial = domainbed.split_environments(colored, 0.2, trial_seed=1)
  for env in range(3):
    np.testing.assert_array_equal(splits[env][0], again[env][0])
    assert not np.array_equal(splits[env][1], other_trial[env][1])
  # Envs 0 and 1 have the same size but their own seeds.
  assert not np.array_equal(splits[0][1], splits[1][1])


# ----------------------------------------------------------------- batches ---

def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for batch_a, batch_b in zip(a, b):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])


def test_train_batches_sample_the_in_splits():
  dataset = _indexed_dataset()
  splits = domainbed.split_environments(dataset, 0.2, trial_seed=0)
  train_envs = [2, 0]
  batches = _take(domainbed.train_batches(dataset, splits, train_envs, 8,
                                          seed=0), 200)
  seen = {env: set() for env in train_envs}
  for batch in batches:
    assert batch["x"].shape == (16, 4, 4, 1) and batch["x"].dtype == np.float32
    assert batch["y"].dtype == np.int32 and batch["domain"].dtype == np.int32
    np.testing.assert_array_equal(batch["domain"], np.repeat([0, 1], 8))
    for position, env in enumerate(train_envs):
      labels = batch["y"][batch["domain"] == position]
      assert np.all(labels // 1000 == env)  # env order = train_envs order
      seen[env].update((labels % 1000).tolist())
    np.testing.assert_array_equal(batch["x"][:, 0, 0, 0] * 255,
                                  batch["y"] % 251)
  for env in train_envs:
    # 1,600 draws with replacement reach every in example, never an out one.
    assert seen[env] == set(splits[env][0].tolist())


def test_train_batches_depend_only_on_seed_and_step(colored):
  splits = domainbed.split_environments(colored, 0.2, trial_seed=0)
  fresh = _take(domainbed.train_batches(colored, splits, [0, 1], 16, seed=3), 5)
  again = _take(domainbed.train_batches(colored, splits, [0, 1], 16, seed=3), 5)
  _assert_batches_equal(fresh, again)
  resumed = _take(domainbed.train_batches(colored, splits, [0, 1], 16, seed=3,
                                          start_step=3), 2)
  _assert_batches_equal(fresh[3:], resumed)
  other = next(domainbed.train_batches(colored, splits, [0, 1], 16, seed=4))
  assert not np.array_equal(other["y"], fresh[0]["y"])
  assert not np.array_equal(fresh[0]["x"], fresh[1]["x"])
  assert fresh[0]["x"].shape == (32, 28, 28, 2)


def test_train_batches_reject_bad_arguments(colored):
  splits = domainbed.split_environments(colored, 0.2, trial_seed=0)
  with pytest.raises(ValueError):
    domainbed.train_batches(colored, splits, [], 8, seed=0)
  with pytest.raises(ValueError):
    domainbed.train_batches(colored, splits, [3], 8, seed=0)


def test_eval_batches_cover_every_example_once():
  dataset = _indexed_dataset()
  splits = domainbed.split_environments(dataset, 0.2, trial_seed=0)
  passes = domainbed.eval_batches(dataset, splits, batch_size=7)
  assert list(passes) == ["env0_in", "env1_in", "env2_in",
                          "env0_out", "env1_out", "env2_out"]
  for env in range(3):
    covered = []
    for part, name in enumerate(("in", "out")):
      batches = list(passes[f"env{env}_{name}"]())
      assert all(set(b) == {"x", "y"} for b in batches)
      assert all(len(b["y"]) == 7 for b in batches[:-1])
      assert 1 <= len(batches[-1]["y"]) <= 7
      labels = np.concatenate([b["y"] for b in batches])
      np.testing.assert_array_equal(labels, env * 1000 + splits[env][part])
      # A second call is a fresh pass.
      again = np.concatenate([b["y"] for b in passes[f"env{env}_{name}"]()])
      np.testing.assert_array_equal(again, labels)
      covered.append(labels % 1000)
    np.testing.assert_array_equal(np.sort(np.concatenate(covered)),
                                  np.arange(len(dataset[env])))


def test_eval_batches_on_colored_mnist(colored):
  splits = domainbed.split_environments(colored, 0.2, trial_seed=0)
  passes = domainbed.eval_batches(colored, splits, batch_size=512)
  batches = list(passes["env2_out"]())
  x = np.concatenate([b["x"] for b in batches])
  assert x.shape == (len(splits[2][1]), 28, 28, 2) and x.dtype == np.float32
  expected = colored[2].images[splits[2][1]].astype(np.float32) / 255.0
  np.testing.assert_array_equal(x, expected)


# ----------------------------------------------------------- image folders ---

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant")


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory):
  """DomainBed's PACS layout: 4 domains x 2 classes x 3 images of assorted
  sizes and formats, plus a file that is not an image."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for d, domain in enumerate(PACS_DOMAINS):
    for c, class_name in enumerate(CLASSES):
      folder = root / "PACS" / domain / class_name
      folder.mkdir(parents=True)
      for i, ext in enumerate((".png", ".jpg", ".JPEG")):
        size = (20 + 7 * i + d, 24 + 5 * c + 3 * i)  # (width, height)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}{ext}")
      (folder / "notes.txt").write_text("not an image")
  return str(root)


@pytest.fixture(scope="module")
def pacs(pacs_root):
  return domainbed.get_dataset("PACS", pacs_root, image_size=32)


def test_image_folder_dataset_layout(pacs, pacs_root):
  assert pacs.environments == ["A", "C", "P", "S"]
  assert pacs.is_image_folder and pacs.num_classes == 2
  assert pacs.input_shape == (32, 32, 3)
  for domain, source in zip(PACS_DOMAINS, pacs.sources):
    assert source.domain_dir == os.path.join(pacs_root, "PACS", domain)
    assert len(source) == 6
    # torchvision ImageFolder order: classes by name, then files by name.
    assert [os.path.relpath(p, source.domain_dir) for p in source.paths] == [
        os.path.join(c, f) for c in CLASSES
        for f in ("img0.png", "img1.jpg", "img2.JPEG")]
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1, 1])


def test_image_folder_eval_transform(pacs):
  source = pacs[1]
  example = source[4]
  assert example["x"].shape == (32, 32, 3) and example["x"].dtype == np.float32
  image = Image.open(source.paths[4]).convert("RGB")
  expected = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR),
                        np.float32) / 255.0
  expected = (expected - image_folder.IMAGENET_MEAN) / image_folder.IMAGENET_STD
  np.testing.assert_allclose(example["x"], expected, rtol=0, atol=1e-6)


def test_image_folder_train_pipeline(pacs):
  splits = domainbed.split_environments(pacs, 0.2, trial_seed=0)
  assert [(len(i), len(o)) for i, o in splits] == [(5, 1)] * 4
  make = lambda start=0, **kw: domainbed.train_batches(
      pacs, splits, [0, 2, 3], 4, seed=0, start_step=start, augment=True, **kw)
  batches = _take(make(), 3)
  low = (0.0 - image_folder.IMAGENET_MEAN) / image_folder.IMAGENET_STD
  high = (1.0 - image_folder.IMAGENET_MEAN) / image_folder.IMAGENET_STD
  for batch in batches:
    assert batch["x"].shape == (12, 32, 32, 3)
    assert batch["x"].dtype == np.float32
    assert np.all(batch["x"] >= low - 1e-5)
    assert np.all(batch["x"] <= high + 1e-5)
    assert np.all(np.isfinite(batch["x"]))
    np.testing.assert_array_equal(np.bincount(batch["domain"]), [4, 4, 4])
    assert set(np.unique(batch["y"])) <= {0, 1}
  _assert_batches_equal(batches[1:], _take(make(start=1), 2))
  # Threads change nothing but the speed.
  _assert_batches_equal(batches, _take(make(worker_count=2), 3))
  # Augmentation: not the eval view of the same examples.
  plain = next(domainbed.train_batches(pacs, splits, [0, 2, 3], 4, seed=0))
  np.testing.assert_array_equal(plain["y"], batches[0]["y"])
  assert not np.allclose(plain["x"], batches[0]["x"])


def test_image_folder_eval_pipeline(pacs):
  splits = domainbed.split_environments(pacs, 0.2, trial_seed=0)
  passes = domainbed.eval_batches(pacs, splits, batch_size=4, worker_count=2)
  assert len(passes) == 8
  batches = list(passes["env3_in"]())
  assert [len(b["y"]) for b in batches] == [4, 1]
  x = np.concatenate([b["x"] for b in batches])
  expected = np.stack([pacs[3][int(i)]["x"] for i in splits[3][0]])
  np.testing.assert_array_equal(x, expected)


def test_train_transform_is_reproducible(pacs):
  image = image_folder.load_rgb(pacs[0].paths[1])
  views = [image_folder.train_transform(image, 32, np.random.default_rng(s))
           for s in (5, 5, 6)]
  np.testing.assert_array_equal(views[0], views[1])
  assert not np.array_equal(views[0], views[2])
  # Tiny or extreme aspect ratios fall back to a central crop.
  thin = Image.new("RGB", (40, 3), (10, 200, 30))
  crop = image_folder.random_resized_crop(thin, 8, np.random.default_rng(0))
  assert crop.size == (8, 8)
  # Hue shifts wrap around and leave gray pixels gray.
  gray = Image.new("RGB", (4, 4), (90, 90, 90))
  assert np.array_equal(np.asarray(image_folder.adjust_hue(gray, -0.3)),
                        np.asarray(gray))


def test_missing_folders_are_named(pacs_root, tmp_path):
  with pytest.raises(errors.DataError) as error:
    domainbed.get_dataset("PACS", str(tmp_path))
  assert os.path.join(str(tmp_path), "PACS", "art_painting") in str(error.value)
  shutil.copytree(os.path.join(pacs_root, "PACS"), tmp_path / "PACS")
  shutil.rmtree(tmp_path / "PACS" / "cartoon")
  with pytest.raises(errors.DataError) as error:
    domainbed.get_dataset("PACS", str(tmp_path), image_size=32)
  message = str(error.value)
  assert os.path.join(str(tmp_path), "PACS", "cartoon") in message
  assert "missing" in message and "1 of them" in message
  with pytest.raises(ValueError, match="data_dir"):
    domainbed.get_dataset("VLCS")


@pytest.mark.parametrize("augment", [False, True])
def test_process_shards_make_up_the_global_batch(pacs, augment):
  """Each process of a multi-host job decodes its slice of every env; the
  slices, put together env by env, are the single-process batch."""
  splits = domainbed.split_environments(pacs, 0.2, trial_seed=0)
  envs, batch_size, processes = [0, 2, 3], 4, 2
  whole = _take(domainbed.train_batches(pacs, splits, envs, batch_size, seed=1,
                                        augment=augment), 2)
  parts = [_take(domainbed.train_batches(pacs, splits, envs, batch_size,
                                         seed=1, augment=augment,
                                         process_shard=(i, processes)), 2)
           for i in range(processes)]
  for step, batch in enumerate(whole):
    for key in batch:
      per_env = [np.split(part[step][key], len(envs)) for part in parts]
      joined = np.concatenate([np.concatenate([p[e] for p in per_env])
                               for e in range(len(envs))])
      np.testing.assert_array_equal(joined, batch[key])
  with pytest.raises(ValueError, match="process_shard"):
    domainbed.train_batches(pacs, splits, envs, 3, seed=1, process_shard=(0, 2))


@pytest.mark.parametrize("cut", ["header only", "garbage"])
def test_an_undecodable_image_is_named(tmp_path, cut):
  path = tmp_path / "broken.jpg"
  Image.new("RGB", (40, 40), (10, 200, 30)).save(path)
  data = path.read_bytes()
  path.write_bytes(data[:20] if cut == "header only" else b"not a jpeg")
  with pytest.raises(errors.DataError,
                     match=rf"{path}: cannot decode the image .*Download it "
                     "again or delete it"):
    image_folder.load_rgb(str(path))
