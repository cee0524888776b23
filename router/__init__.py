"""Request placement: prefix index, load tracker, policies (DualMap), simulator.

Imports only ``splitserve`` vocabulary: never ``roles``, ``kernels`` or torch.
"""
