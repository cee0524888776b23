"""Tools on top of the cluster and its frontends: the ``splitserve`` CLI, ``bench``, batch runs
and the gRPC stub generator. Nothing below ``cluster/`` imports them.
"""
