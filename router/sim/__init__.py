"""The cluster simulator: the real router driven by simulated instances and a cost model.

``cost_model.py`` (prefill / decode times, fitted on measured timings), ``trace.py``
(Mooncake-format traces), ``simulator.py`` (discrete-event loop), ``bench.py``
(``splitserve bench router``: effective capacity per policy by bisection).
"""
