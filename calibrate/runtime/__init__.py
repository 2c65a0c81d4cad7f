"""A real, small MoE inference runtime (PyTorch, CPU) that serves a scenario for real.

model.py         the weights and kernels of a scaled-down Mixtral-like model (seeded)
expert_store.py  host expert pool, fixed device-side slots, the copy thread (sim's ExpertCache decides)
server.py        continuous batching with the simulator's own Replica batching rules, real iterations
recorder.py      the per-request, per-iteration and routing records of a run

Importing this package imports torch; ``sim`` never imports it."""
