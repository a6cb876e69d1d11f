"""Kernel code below the public op modules: launchers of the CUDA C kernels (``dispatch``), code generation
(``glu_codegen``) and launch (``glu_launch``) of the Numba activation kernels."""
