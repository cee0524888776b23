"""Control plane: cluster config, registry, launcher, frontends, CLI, batch.

The top layer: may import everything else; nothing imports it.
"""
