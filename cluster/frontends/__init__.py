"""Frontends: the OpenAI HTTP server, the gRPC server and client, their shared protocol code.

Owns everything a user's request crosses before it reaches the cluster's request path: the
OpenAI protocol models, prompt building, the ``Backend`` the servers call (a cluster or one
engine), SSE / gRPC streaming, Prometheus metrics and ``serve``. Must not place requests or
touch workers: that is the orchestration layer's (``splitserve.cluster``) job.
"""
