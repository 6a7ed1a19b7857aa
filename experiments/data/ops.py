"""Preprocessing ops of the input pipeline: decoding, normalisation, augmentation.

Images arrive encoded (decoding is skipped in TFDS so that shuffling and
resume-skipping move small byte strings, and so that ImageNet can decode only
the crop); they are decoded here. Every op is a TensorFlow op, run inside
`tf.data` maps; random ones are stateless, seeded by the caller, so batches do
not depend on timing or on where iteration started.

Example:
  preprocess = ops.preprocess_fn(specs.spec('cifar10'), train=True)
  ds = ds.map(lambda i, ex: preprocess(ex, tf.stack([epoch_seed, i])))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from experiments.data import specs
from experiments.data import tf_import

if TYPE_CHECKING:
  import tensorflow as tf  # Annotations only: TF is imported on first use.


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """Scales uint8 `image` to [0, 1], then standardises per channel."""
  tf = tf_import.tensorflow()
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_pad_crop_flip(image: tf.Tensor, seed: tf.Tensor,
                         pad: int = 4) -> tf.Tensor:
  """CIFAR augmentation: zero-padded random crop, then random h-flip.

  Matches torchvision's `RandomCrop(size, padding=4)` (zero padding, applied
  to raw pixels before normalisation) + `RandomHorizontalFlip()`.

  Args:
    image: [H, W, C] image (any dtype), before normalisation.
    seed: int32/int64 [2] seed for the stateless random ops.
    pad: pixels of zero padding on each side.

  Returns:
    An image of the same shape and dtype.
  """
  tf = tf_import.tensorflow()
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def inception_crop_flip(image_bytes: tf.Tensor, seed: tf.Tensor,
                        size: int = 224) -> tf.Tensor:
  """ImageNet training crop: random resized crop + random h-flip.

  Inception-style crop (area fraction in (0.08, 1), aspect ratio in
  (3/4, 4/3)), like torchvision's `RandomResizedCrop(224)`. Only the crop
  window of the JPEG is decoded.

  Args:
    image_bytes: encoded JPEG string.
    seed: int32/int64 [2] seed for the stateless random ops.
    size: output height and width.

  Returns:
    A float32 [size, size, 3] image with values in [0, 255].
  """
  tf = tf_import.tensorflow()
  box_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(image_bytes),
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=box_seed,
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(
      image_bytes, tf.stack([y, x, h, w]), channels=3)
  image = tf.image.resize(image, [size, size], method='bilinear')
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def resize_center_crop(image: tf.Tensor, resize: int = 256,
                       crop: int = 224) -> tf.Tensor:
  """ImageNet evaluation: resize the shorter side to `resize`, centre crop.

  Returns:
    A float32 [crop, crop, C] image with values in [0, 255].
  """
  tf = tf_import.tensorflow()
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new_shape, method='bilinear')
  top = (new_shape[0] - crop) // 2
  left = (new_shape[1] - crop) // 2
  return image[top:top + crop, left:left + crop, :]


def decode(spec: specs.Spec, image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes an encoded image to uint8 [H, W, spec.channels]."""
  tf = tf_import.tensorflow()
  image = tf.io.decode_image(image_bytes, channels=spec.channels,
                             expand_animations=False)
  if spec.augment != 'inception':
    # Small data sets have a fixed shape; telling TF lets batching work.
    image.set_shape(spec.input_shape)
  return image


def preprocess_fn(spec: specs.Spec, train: bool) -> Callable[..., dict]:
  """Returns `fn(example, seed) -> {'image', 'label'}` for `spec`."""

  def fn(example, seed):
    tf = tf_import.tensorflow()
    image_bytes = example['image']
    if spec.augment == 'inception':
      if train:
        image = inception_crop_flip(image_bytes, seed, spec.input_shape[0])
      else:
        image = resize_center_crop(decode(spec, image_bytes), 256,
                                   spec.input_shape[0])
      # Resizing gives float pixels in [0, 255]; normalize() rescales them.
    else:
      image = decode(spec, image_bytes)
      if train and spec.augment == 'pad_crop_flip':
        image = random_pad_crop_flip(image, seed)
    image = normalize(image, spec.mean, spec.std)
    image = tf.ensure_shape(image, spec.input_shape)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return fn
