"""A faithful PyTorch port of the CaMU reference pipeline (Shen et al., SDM 2024).

It keeps the reference's design (DataLoader at batch 32, teacher forward passes on every step,
two Adam optimizers, a Python pass to build the counterfactuals) and serves as the speed
baseline and the parity oracle for camu_jax. Plain PyTorch: torchvision is not needed.

Modules: `models` (CNN, ResNet18 with ImageNet or CIFAR stem), `data` (loaders and the
counterfactual construction of `prepare.py`), `camu` (the unlearning loop of `remove.py`),
`train` (original training), `evaluate` (accuracy).
"""
