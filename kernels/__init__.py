"""CUDA C sources of moe_raw, shipped as the package moe_raw.kernels (setup.cfg maps this directory)."""
