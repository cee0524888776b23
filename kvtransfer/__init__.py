"""KV transfer between workers: layout, transfer params, connector halves, transports.

Imports only ``splitserve`` vocabulary (and ``kernels`` for the gather/scatter copies).
"""
