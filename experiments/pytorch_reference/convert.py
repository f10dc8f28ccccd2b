"""Weight conversion between camu_jax's Flax models and PyTorch modules.

Supported PyTorch layouts (detected from the `state_dict` keys):

* the reference CNN (`Model.CNN`, `experiments.pytorch_reference.models.CNN`): `conv1.0`,
  `conv2.0`, `fc1`, `fc2.0`, `fc2.1`  <->  Flax `conv1`, `conv2`, `fc1`, `fc2`, `fc3`;
* the reference ResNet (`Model.ResNet`, `...models.ReferenceResNet`): `feature_extractor.0`
  (conv1), `.1` (bn1), `.4`-`.7` (layer1-layer4), head `fc2`;
* a torchvision-layout `resnet18` (`conv1`, `bn1`, `layer1`-`layer4`, `fc`).

Flax ResNet names: stem `conv1`, `bn1`; blocks `layer{1..4}_{0,1}` with `conv1`, `bn1`,
`conv2`, `bn2`, `downsample_conv`, `downsample_bn`; head `fc`.

Leaves: conv kernel HWIO <-> weight OIHW, dense kernel `[in, out]` <-> weight `[out, in]`
(the Flax CNN flattens channel-major, so `fc1` is a plain transpose too), bias <-> bias,
BatchNorm scale/bias <-> weight/bias, batch_stats mean/var <-> running_mean/running_var.
PyTorch's `num_batches_tracked` is left alone (momentum is fixed, so it is never read).

torch is imported inside the functions only; importing this module does not need it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

_CNN_NAMES = {"conv1": "conv1.0", "conv2": "conv2.0", "fc1": "fc1", "fc2": "fc2.0", "fc3": "fc2.1"}
_BLOCK_NAMES = {
    "conv1": "conv1",
    "bn1": "bn1",
    "conv2": "conv2",
    "bn2": "bn2",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
}
_RESNET_LAYOUTS = {
    # layout: (stem conv, stem bn, stage prefix format, head)
    "reference": ("feature_extractor.0", "feature_extractor.1", "feature_extractor.{}", "fc2"),
    "torchvision": ("conv1", "bn1", "layer{}", "fc"),
}
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _state_dict(torch_model) -> Mapping[str, Any]:
    return torch_model if isinstance(torch_model, Mapping) else torch_model.state_dict()


def _resnet_layout(keys) -> str:
    if "feature_extractor.0.weight" in keys:
        return "reference"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision"
    raise ValueError(
        "unrecognised PyTorch ResNet layout (expected the reference's or torchvision's)"
    )


def _torch_module(flax_module: tuple[str, ...], is_cnn: bool, layout: str | None) -> str:
    """Flax module path (e.g. `('layer2_0', 'downsample_bn')`) -> PyTorch module prefix."""
    if is_cnn:
        if len(flax_module) != 1 or flax_module[0] not in _CNN_NAMES:
            raise KeyError(f"no PyTorch counterpart for Flax CNN module {flax_module}")
        return _CNN_NAMES[flax_module[0]]
    stem_conv, stem_bn, stage, head = _RESNET_LAYOUTS[layout]
    if flax_module == ("conv1",):
        return stem_conv
    if flax_module == ("bn1",):
        return stem_bn
    if flax_module == ("fc",):
        return head
    match = re.fullmatch(r"layer(\d)_(\d)", flax_module[0]) if len(flax_module) == 2 else None
    if match is None or flax_module[1] not in _BLOCK_NAMES:
        raise KeyError(f"no PyTorch counterpart for Flax ResNet module {flax_module}")
    s, b = int(match.group(1)), int(match.group(2))
    stage_prefix = stage.format(s + 3 if layout == "reference" else s)
    return f"{stage_prefix}.{b}.{_BLOCK_NAMES[flax_module[1]]}"


def _key_map(variables: Mapping[str, Any], torch_keys) -> dict[tuple[str, ...], str]:
    """`(collection, *module path, leaf)` -> PyTorch state_dict key, for every Flax leaf."""
    is_cnn = "conv1.0.weight" in torch_keys and "fc2.0.weight" in torch_keys
    layout = None if is_cnn else _resnet_layout(torch_keys)
    out = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection) or {}
        for path in traverse_util.flatten_dict(dict(tree)):
            leaf = (collection, path[-1])
            if leaf not in _LEAF_NAMES:
                raise KeyError(f"unknown Flax leaf {collection}/{'/'.join(path)}")
            prefix = _torch_module(tuple(path[:-1]), is_cnn, layout)
            out[(collection, *path)] = f"{prefix}.{_LEAF_NAMES[leaf]}"
    return out


def _to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:  # HWIO -> OIHW
            return array.transpose(3, 2, 0, 1)
        if array.ndim == 2:  # [in, out] -> [out, in]
            return array.T
        raise ValueError(f"kernel of rank {array.ndim} is not supported")
    return array


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:  # OIHW -> HWIO
            return array.transpose(2, 3, 1, 0)
        if array.ndim == 2:
            return array.T
        raise ValueError(f"weight of rank {array.ndim} is not supported")
    return array


def flax_to_torch(variables: Mapping[str, Any], torch_model) -> None:
    """Loads Flax `{'params', 'batch_stats'}` into `torch_model` (in place, on its device).

    Every parameter and BatchNorm running statistic of the PyTorch module must be covered
    (except `num_batches_tracked`), and every shape must match; otherwise `ValueError`.
    """
    import torch

    state = torch_model.state_dict()
    mapping = _key_map(variables, state.keys())
    new_state = dict(state)
    covered = set()
    for (collection, *path), key in mapping.items():
        if key not in state:
            raise ValueError(f"PyTorch module has no {key!r} (for Flax {'/'.join(path)})")
        value = np.asarray(traverse_util.flatten_dict(dict(variables[collection]))[tuple(path)])
        value = np.array(_to_torch_layout(value, path[-1]), order="C")  # writable copy
        target = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: Flax gives {value.shape}, PyTorch has {tuple(target.shape)}")
        new_state[key] = torch.from_numpy(value).to(dtype=target.dtype, device=target.device)
        covered.add(key)
    missing = [k for k in state if k not in covered and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"Flax variables do not cover PyTorch entries: {missing}")
    torch_model.load_state_dict(new_state, strict=True)


def params_to_torch(params: Mapping[str, Any], torch_model) -> dict:
    """Any params-shaped tree (e.g. Adam moments `mu`/`nu`) -> `{state_dict key: tensor}`.

    Layouts are converted as for the parameters themselves; leaves that are not arrays (e.g.
    `optax.MaskedNode`) are skipped. Tensors get the dtype and device of the module's entries.
    """
    import torch

    state = torch_model.state_dict()
    flat = traverse_util.flatten_dict(dict(params))
    arrays = {p: v for p, v in flat.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    template = {"params": traverse_util.unflatten_dict(arrays), "batch_stats": {}}
    out = {}
    for (_, *path), key in _key_map(template, state.keys()).items():
        value = np.array(_to_torch_layout(np.asarray(arrays[tuple(path)]), path[-1]), order="C")
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(
                f"{key}: tree gives {value.shape}, PyTorch has {tuple(state[key].shape)}"
            )
        out[key] = torch.from_numpy(value).to(dtype=state[key].dtype, device=state[key].device)
    return out


def torch_to_flax(torch_model, variables_template: Mapping[str, Any]) -> dict:
    """Reads a PyTorch module (or its `state_dict`) into the structure of `variables_template`.

    Returns `{'params': ..., 'batch_stats': ...}` (batch_stats `{}` for the CNN) with
    `jax.Array` leaves of the template's dtypes; shapes are checked against the template.
    """
    import jax.numpy as jnp

    state = _state_dict(torch_model)
    mapping = _key_map(variables_template, state.keys())
    flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for collection in ("params", "batch_stats"):
        template = traverse_util.flatten_dict(dict(variables_template.get(collection) or {}))
        for path, leaf_template in template.items():
            key = mapping[(collection, *path)]
            if key not in state:
                raise ValueError(f"PyTorch module has no {key!r} (for Flax {'/'.join(path)})")
            value = _to_flax_layout(state[key].detach().cpu().numpy(), path[-1])
            if tuple(value.shape) != tuple(leaf_template.shape):
                raise ValueError(
                    f"{key}: PyTorch gives {value.shape}, template has {leaf_template.shape}"
                )
            flat[collection][path] = jnp.asarray(value, dtype=leaf_template.dtype)
    return {
        "params": traverse_util.unflatten_dict(flat["params"]),
        "batch_stats": traverse_util.unflatten_dict(flat["batch_stats"])
        if flat["batch_stats"]
        else {},
    }
