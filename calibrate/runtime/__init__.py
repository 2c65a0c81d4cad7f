"""A real, small MoE inference runtime (PyTorch, CPU) that serves a scenario for real.

model.py         the weights and kernels of a scaled-down Mixtral-like model (seeded)
routers.py       trained routers shipped in data/ (or the seeded ones): which the model routes with
train_routers.py how the shipped routers were trained (stdlib text, every other weight frozen)
expert_store.py  host expert pool, fixed device-side slots, the copy thread (sim's ExpertCache decides)
server.py        continuous batching with the simulator's own Replica batching rules, real iterations
recorder.py      the per-request, per-iteration and routing records of a run

Importing this package imports torch; ``sim`` never imports it."""
