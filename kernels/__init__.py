"""Compute kernels: Triton on GPUs, pure-torch references (``reference.py``) elsewhere.

``ops`` picks the implementation; ``SPLITSERVE_KERNELS=triton|torch`` forces one.
Imports only ``splitserve`` vocabulary.
"""
