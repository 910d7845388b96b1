"""DomainBed's folder datasets, `<domain_dir>/<class>/<image>`, via Pillow.

`ImageFolderSource` is a random-access source (len and [i], usable by grain)
over one domain folder. It lists images like torchvision's ImageFolder (class
folders sorted by name, files found by a sorted os.walk, sorted by name,
filtered by extension), so indices, and hence DomainBed's seeded in/out
splits, match DomainBed's on the same files.

The transforms are DomainBed's, on Pillow images as torchvision applies them
to Pillow images, with the random parameters drawn from an explicit numpy
Generator (so they are reproducible, though not torch's random stream):
  train  RandomResizedCrop(size, scale=(0.7, 1.0)), RandomHorizontalFlip,
         ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale(p=0.1),
         ToTensor, ImageNet Normalize
  eval   Resize((size, size)), ToTensor, ImageNet Normalize
Outputs are channels last: float32 (size, size, 3).
"""

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFile

from fishr_jax import errors

# DomainBed sets this: some TerraIncognita JPEGs are truncated, and
# torchvision's loader would otherwise fail on them.
ImageFile.LOAD_TRUNCATED_IMAGES = True

# torchvision's IMG_EXTENSIONS, matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                    ".tiff", ".webp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.3  # brightness, contrast, saturation and hue alike
GRAYSCALE_PROB = 0.1


def find_classes(domain_dir: str) -> list[str]:
  """The class folders of one domain, sorted by name (hidden ones skipped)."""
  return sorted(entry.name for entry in os.scandir(domain_dir)
                if entry.is_dir() and not entry.name.startswith("."))


def list_images(domain_dir: str,
                classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """(paths, int32 labels) in torchvision ImageFolder's order; the label of a
  file is the position of its class folder in `classes`."""
  paths, labels = [], []
  for label, class_name in enumerate(classes):
    class_dir = os.path.join(domain_dir, class_name)
    if not os.path.isdir(class_dir):
      continue  # a class absent from this domain
    for root, _, file_names in sorted(os.walk(class_dir, followlinks=True)):
      for file_name in sorted(file_names):
        if file_name.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(root, file_name))
          labels.append(label)
  return paths, np.asarray(labels, np.int32)


def load_rgb(path: str) -> Image.Image:
  """The image at `path` as RGB; errors.DataError, naming the file, if it
  cannot be decoded (cut short, not an image)."""
  try:
    with open(path, "rb") as f:
      return Image.open(f).convert("RGB")
  except (OSError, SyntaxError, ValueError) as e:
    raise errors.DataError(
        f"{path}: cannot decode the image ({type(e).__name__}: {e}). "
        "Download it again or delete it.") from e


def to_normalized_array(image: Image.Image) -> np.ndarray:
  """ToTensor + Normalize, channels last: float32 (H, W, 3)."""
  x = np.asarray(image, np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def random_resized_crop(image: Image.Image, size: int,
                        rng: np.random.Generator) -> Image.Image:
  """torchvision's RandomResizedCrop(size, scale=CROP_SCALE) on a Pillow
  image: up to 10 tries at a box of random area and aspect ratio that fits,
  else a central crop at the nearest allowed ratio; then a bilinear resize."""
  width, height = image.size
  area = width * height
  log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
  box = None
  for _ in range(10):
    target_area = area * rng.uniform(*CROP_SCALE)
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      box = (left, top, left + w, top + h)
      break
  if box is None:
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
      w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
      w, h = int(round(height * CROP_RATIO[1])), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    box = (left, top, left + w, top + h)
  # Crop first, then resize: resizing with box= would let the filter read
  # pixels outside the crop, which torchvision's crop-then-resize does not.
  return image.crop(box).resize((size, size), Image.Resampling.BILINEAR)


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision's adjust_hue for Pillow images: shift the uint8 hue channel
  of Pillow's HSV by hue_factor * 255 (truncated), wrapping around."""
  hue, saturation, value = image.convert("HSV").split()
  shift = int(hue_factor * 255) % 256
  hue_array = ((np.asarray(hue, np.int32) + shift) % 256).astype(np.uint8)
  hue = Image.fromarray(hue_array, "L")
  return Image.merge("HSV", (hue, saturation, value)).convert(image.mode)


def color_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """ColorJitter(JITTER, JITTER, JITTER, JITTER): the four adjustments in a
  random order, with factors drawn as torchvision draws them."""
  order = rng.permutation(4)
  brightness = rng.uniform(1.0 - JITTER, 1.0 + JITTER)
  contrast = rng.uniform(1.0 - JITTER, 1.0 + JITTER)
  saturation = rng.uniform(1.0 - JITTER, 1.0 + JITTER)
  hue = rng.uniform(-JITTER, JITTER)
  for op in order:
    if op == 0:
      image = ImageEnhance.Brightness(image).enhance(brightness)
    elif op == 1:
      image = ImageEnhance.Contrast(image).enhance(contrast)
    elif op == 2:
      image = ImageEnhance.Color(image).enhance(saturation)
    else:
      image = adjust_hue(image, hue)
  return image


def train_transform(image: Image.Image, size: int,
                    rng: np.random.Generator) -> np.ndarray:
  """DomainBed's augmentation; float32 (size, size, 3), normalized."""
  image = random_resized_crop(image, size, rng)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  image = color_jitter(image, rng)
  if rng.random() < GRAYSCALE_PROB:
    # Gray replicated over the 3 channels, as rgb_to_grayscale(img, 3).
    image = image.convert("L").convert("RGB")
  return to_normalized_array(image)


def eval_transform(image: Image.Image, size: int) -> np.ndarray:
  """Resize((size, size)) + normalization; float32 (size, size, 3)."""
  image = image.resize((size, size), Image.Resampling.BILINEAR)
  return to_normalized_array(image)


class ImageFolderSource:
  """Random-access source over one domain folder.

  source[i] = {"x": eval-transformed float32 (size, size, 3), "y": int32};
  source.load(i, rng) gives the augmented version, drawn from `rng`.
  """

  def __init__(self, domain_dir: str, classes: Sequence[str],
               image_size: int = 224):
    self.domain_dir = domain_dir
    self.classes = list(classes)
    self.image_size = image_size
    self.paths, self.labels = list_images(domain_dir, self.classes)
    if not self.paths:
      raise errors.DataError(
          f"No images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders "
          f"of {domain_dir}.")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.load(index)

  def load(self, index: int,
           rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Example `index`, augmented when `rng` is given."""
    image = load_rgb(self.paths[index])
    if rng is None:
      x = eval_transform(image, self.image_size)
    else:
      x = train_transform(image, self.image_size, rng)
    return {"x": x, "y": self.labels[index]}
