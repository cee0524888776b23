"""Workers and what runs inside them: the engine, the models, the role actors.

May import ``splitserve`` (vocabulary), ``kernels``, ``kvtransfer`` and ``router``; never ``cluster``.
"""
