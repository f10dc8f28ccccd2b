"""From images to model inputs, on device, and epoch index plans on the host.

Images stay uint8 (or the caller's floats) on device; preprocessing (scale, normalise, resize,
augment) runs inside the jitted epoch so the host only ships index arrays. Every batch has the
full batch size: the short last batch of an epoch is padded and carries a 0/1 `mask`, which the
losses and BatchNorm honour, so the computation equals PyTorch's on the short batch while shapes
(and compiles) stay fixed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How inputs become model inputs (see `preprocess` for the dtypes): `[H, W, C]` images,
    or any other shape of float inputs (`[D]` features, `[T, D]` sequences).

    mean/std: per-channel (last axis) normalisation after scaling to [0, 1] (MNIST-like:
      none, as the reference's `ToTensor()`; CIFAR: ImageNet statistics).
    resize: square output size (224 for the ImageNet-stem ResNet18), or None; images only.
    augment: random horizontal flip and random crop (pad 4) for training batches; images only.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: int | None = None
    augment: bool = False

    def input_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        if (self.resize or self.augment) and len(image_shape) != 3:
            raise ValueError(
                f"inputs of shape {tuple(image_shape)} are not [H, W, C] images: resize and "
                "augment (flips, crops) apply to images only; use InputSpec(resize=None, "
                "augment=False) for features or sequences"
            )
        if self.resize:
            return (self.resize, self.resize, image_shape[-1])
        return tuple(image_shape)


def input_spec_for(dataset: str, model: str) -> InputSpec:
    """The reference's transforms for a dataset/model pair."""
    from camu_jax.data import catalog

    if catalog.info(dataset).family == "cifar":
        return InputSpec(
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=224 if model == "resnet18" else None,
            augment=True,
        )
    return InputSpec()


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceData:
    """One split on device, with what every loop over it needs.

    images: uint8 `[N, H, W, C]` or floats of any shape `[N, ...]` (features `[N, D]`,
    sequences `[N, T, D]`), labels: int32 `[N]`, both replicated over `mesh`;
    host_labels: the same labels on the host (index plans and metrics); spec: how images
    become model inputs; mesh: the `(member, data)` mesh they live on.
    """

    images: jax.Array
    labels: jax.Array
    host_labels: np.ndarray
    spec: InputSpec
    mesh: Mesh
    _placed: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def put(
        cls, images, labels, *, spec: InputSpec | None = None, mesh: Mesh | None = None
    ) -> DeviceData:
        """Host `images`, `labels` on device; default `spec` none (`InputSpec()`), default
        `mesh` every device (`sharding.make_mesh()`).

        Raises ValueError, naming the shapes or values, unless `labels` are `[N]` integer
        class indices (>= 0) for the `N` rows of `images`."""
        from camu_jax import sharding

        spec = InputSpec() if spec is None else spec
        mesh = sharding.make_mesh() if mesh is None else mesh
        images = np.asarray(images)
        # uint8 arrays are pixels: [N, H, W] would be read as H rows of W-channel pixels.
        # Float arrays are taken in any shape a model accepts: [N, D], [N, T, D], images.
        if images.dtype == np.uint8 and images.ndim != 4:
            raise ValueError(
                f"images must be [N, H, W, C], with a channel axis (images[..., None] for "
                f"greyscale); got shape {images.shape} (uint8 arrays are read as pixels; give "
                "features or sequences, [N, D] or [N, T, D], as floats)"
            )
        if images.ndim < 2:
            raise ValueError(
                f"inputs must be [N, ...] with one row per example ([N, D] features at least); "
                f"got shape {images.shape}"
            )
        spec.input_shape(images.shape[1:])  # resize and augment need images
        host_labels = _class_indices(labels, images.shape)
        dev_images, dev_labels = sharding.replicate((images, host_labels), mesh)
        return cls(dev_images, dev_labels, host_labels, spec, mesh)

    def on(self, mesh: Mesh) -> DeviceData:
        """This split replicated over `mesh` instead (a phase's placement, `engine.place`);
        itself when `mesh` is its own; one copy per mesh, kept."""
        if mesh == self.mesh:
            return self
        if mesh not in self._placed:
            from camu_jax import sharding

            images, labels = sharding.move_replicated((self.images, self.labels), mesh)
            self._placed[mesh] = DeviceData(images, labels, self.host_labels, self.spec, mesh)
        return self._placed[mesh]

    def joined(self, other: DeviceData) -> DeviceData:
        """This split's rows, then `other`'s (same spec and mesh), in one device array: on a
        CPU joined in host memory (where its devices' arrays live), no program compiled;
        elsewhere, or across processes, in one program on the devices."""
        from camu_jax import sharding

        pairs = ((self.images, other.images), (self.labels, other.labels))
        if jax.default_backend() == "cpu" and all(
            x.is_fully_addressable for pair in pairs for x in pair
        ):
            images, labels = sharding.replicate(
                tuple(np.concatenate([np.asarray(a), np.asarray(b)]) for a, b in pairs), self.mesh
            )
        else:
            images, labels = _joiner(self.mesh)(
                (self.images, self.labels), (other.images, other.labels)
            )
        return DeviceData(
            images,
            labels,
            np.concatenate([self.host_labels, other.host_labels]),
            self.spec,
            self.mesh,
        )

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.spec.input_shape(tuple(self.images.shape[1:]))


def _class_indices(labels, image_shape: tuple[int, ...]) -> np.ndarray:
    """`labels` as int32 `[N]`, refused unless they are integer class indices (>= 0) for
    `image_shape[0]` images: a cast would truncate float labels and wrap huge ones."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one class index per image, [N]; got shape {labels.shape}")
    if not image_shape or image_shape[0] != labels.shape[0]:
        raise ValueError(
            f"images of shape {image_shape} and labels of shape {labels.shape} differ in rows: "
            "one label per image"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels of dtype {labels.dtype} (first {labels[:5].tolist()}): class indices must "
            "be integers (an integer dtype; floats would be truncated)"
        )
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        rows = np.flatnonzero((labels < 0) | (labels > np.iinfo(np.int32).max))
        raise ValueError(
            f"labels {labels[rows[:10]].tolist()} at rows {rows[:10].tolist()}: class indices "
            "must lie in 0..num_classes-1"
        )
    return labels.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _joiner(mesh: Mesh):
    from camu_jax import sharding

    # Images and labels in one program.
    return jax.jit(
        lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b),
        out_shardings=sharding.replicated(mesh),
    )


def _augment_one(key: jax.Array, image: jax.Array) -> jax.Array:
    flip_key, crop_key = jax.random.split(key)
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    h, w, _ = image.shape
    padded = jnp.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    dy, dx = jax.random.randint(crop_key, (2,), 0, 9)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)


def preprocess(
    images: jax.Array, spec: InputSpec, *, augment_keys: jax.Array | None = None
) -> jax.Array:
    """Images `[b, H, W, C]` -> float `[b, H', W', C]` (other inputs, `[b, ...]` floats, keep
    their shape); `augment_keys` (`[b]` keys) enables augmentation (only when `spec.augment`;
    images only).

    uint8 images are pixel values and are scaled by 1/255, as `ToTensor()` does; floating
    images are taken as already scaled (what `ToTensor()` returns) and are not divided again.
    Either way `spec`'s augmentation, resize and mean/std come next. Other dtypes are refused:
    whether an int32 image holds 0..255 or 0..1 cannot be told. The float type is JAX's
    default: float32, or float64 when x64 is enabled (the float64 equivalence tests).
    """
    dtype = jnp.result_type(float)
    if images.dtype == jnp.uint8:
        x = images.astype(dtype) / 255.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(dtype)
    else:
        raise TypeError(
            f"images of dtype {images.dtype}: expected uint8 (pixel values 0..255, scaled by "
            "1/255) or a floating dtype (already scaled, used as it is)"
        )
    if spec.augment and augment_keys is not None:
        x = jax.vmap(_augment_one)(augment_keys, x)
    if spec.resize:
        b, _, _, c = x.shape
        x = jax.image.resize(x, (b, spec.resize, spec.resize, c), "bilinear")
    mean = jnp.asarray(spec.mean, dtype)
    std = jnp.asarray(spec.std, dtype)
    return (x - mean) / std


def item_keys(key: jax.Array, item_ids: jax.Array) -> jax.Array:
    """One key per item id: a fixed augmentation per item."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(item_ids)


def pad_to_batches(order: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`order` `[n]` -> `(ids [steps, batch], mask [steps, batch])`, steps = ceil(n / batch)."""
    n = order.shape[0]
    steps = -(-n // batch_size)
    ids = np.zeros(steps * batch_size, np.int32)
    ids[:n] = order
    mask = np.zeros(steps * batch_size, np.float32)
    mask[:n] = 1.0
    return ids.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def shuffled_batches(
    n: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of a shuffled `DataLoader(batch_size, drop_last=False)` over `n` items."""
    return pad_to_batches(rng.permutation(n).astype(np.int32), batch_size)
