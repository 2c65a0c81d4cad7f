"""The links between the GPUs of one expert-parallel group, and what collectives cost on them.

A group of G GPUs sits on nodes of ``gpus_per_node`` GPUs. Every link is a resource with a bandwidth
and a latency:

* intra-node, ``nvlink``: an NVSwitch; each GPU has its own port (one direction out, one in) of the
  profile's ``gpu_to_gpu`` bandwidth, so traffic contends only at the sending and receiving ports;
* intra-node, ``pcie``: each GPU's x16 port, and in addition every GPU-to-GPU byte of a node crosses
  the node's one shared host bridge (root complex), so all pairs of a node contend there;
* inter-node: one NIC per GPU (out and in) of ``nic_gbps``.

A collective's flows run at once and share these links, so (fluid model) it lasts as long as its most
loaded link needs to move its bytes, plus the latency of the slowest kind of link it uses:
``max over links (bytes on link / bandwidth) + latency``. Local bytes (a GPU to itself) are free.
Cross-group contention (two replicas sharing a node's host bridge or NIC) is not modelled.

Measured collectives (``hardware.topology.collective_model``, default ``auto``). A profile may carry
NCCL tables (``HardwareProfile.collective_s``, e.g. the imported aiconfigurator H100/H200/A100 ones for
2/4/8 GPUs of one NVLink node). Their ``nbytes`` is the per-rank buffer of nccl-tests: for all_reduce
the buffer every rank reduces; for all_to_all the whole send buffer of one rank, split evenly over the
G ranks (itself included), so a uniform all-to-all of buffer S puts S (G-1)/G bytes on every send and
receive port. The engine's all-to-all is a per-pair traffic matrix, generally not uniform; it is mapped
onto the table by its busiest port: with B = the largest bytes any GPU sends or receives off itself,
the time is the measured time of the uniform all-to-all whose ports each carry B, i.e. at buffer
S_eq = B G / (G-1). A balanced matrix gets exactly the measured figure; an unbalanced one the time of a
uniform collective as loaded as its busiest port (the latency part is not multiplied by the imbalance,
which scaling the uniform time by B / B_uniform would do). The tables were measured on one NVLink node,
so ``auto`` uses them only for a group on one node with ``intra_node: nvlink`` and a table of that kind
on exactly that GPU count, else the link model; ``measured`` demands them (a one-line error otherwise);
``link`` never uses them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.policies.ep_specs import TopologySpec
from sim.profile import HardwareProfile


@dataclass(frozen=True)
class Topology:
    """G GPUs, the node each sits on, and the bandwidth (bytes/s) and latency (s) of each kind of link."""

    node_of: np.ndarray  # [G] node index of each GPU in the group
    intra_kind: str  # "nvlink" or "pcie"
    intra_bytes_per_s: float
    intra_latency_s: float
    bridge_bytes_per_s: float | None  # shared host bridge per node (pcie only)
    nic_bytes_per_s: float
    nic_latency_s: float
    # The profile whose NCCL tables cost the collectives, per kind (None: the link model for every kind).
    measured: HardwareProfile | None = None
    measured_kinds: frozenset[str] = frozenset()

    def collective_model(self, kind: str) -> str:
        """``measured`` or ``link``: which model costs collective ``kind`` in this group."""
        return "measured" if kind in self.measured_kinds else "link"

    @property
    def num_gpus(self) -> int:
        return len(self.node_of)

    def all_to_all_s(self, nbytes: np.ndarray) -> np.ndarray:
        """Seconds of an all-to-all whose flow src -> dst carries ``nbytes[..., src, dst]`` bytes
        (leading axes, e.g. MoE layers, are independent collectives)."""
        b = np.array(nbytes, dtype=np.float64, copy=True)
        G = self.num_gpus
        idx = np.arange(G)
        b[..., idx, idx] = 0.0  # a GPU's own tokens never leave it
        if "all_to_all" in self.measured_kinds:
            busiest = np.maximum(b.sum(axis=-1).max(axis=-1), b.sum(axis=-2).max(axis=-1))
            uniform_buffer = busiest * G / (G - 1)  # the uniform all-to-all with the same busiest port
            return np.asarray(self.measured.collective_s("all_to_all", uniform_buffer, G), dtype=np.float64)  # type: ignore[union-attr]
        same = self.node_of[:, None] == self.node_of[None, :]
        intra = np.where(same, b, 0.0)
        inter = b - intra
        port_bytes = np.maximum(intra.sum(axis=-1).max(axis=-1), intra.sum(axis=-2).max(axis=-1))
        seconds = port_bytes / self.intra_bytes_per_s
        nic_bytes = np.maximum(inter.sum(axis=-1).max(axis=-1), inter.sum(axis=-2).max(axis=-1))
        seconds = np.maximum(seconds, nic_bytes / self.nic_bytes_per_s)
        if self.bridge_bytes_per_s is not None:
            nodes = np.unique(self.node_of)
            onehot = (self.node_of[:, None] == nodes[None, :]).astype(np.float64)  # [G, N]
            per_node = np.einsum("...sd,sn->...n", intra, onehot)
            seconds = np.maximum(seconds, per_node.max(axis=-1) / self.bridge_bytes_per_s)
        latency = np.maximum(
            np.where(intra.sum(axis=(-1, -2)) > 0, self.intra_latency_s, 0.0),
            np.where(inter.sum(axis=(-1, -2)) > 0, self.nic_latency_s, 0.0),
        )
        return np.where(b.sum(axis=(-1, -2)) > 0, seconds + latency, 0.0)

    def all_reduce_s(self, nbytes: float | np.ndarray, gpus: np.ndarray) -> np.ndarray:
        """Ring all-reduce of ``nbytes`` over the group's GPUs ``gpus``: 2 (n-1) steps, each moving
        nbytes / n from every GPU to the next on the ring, at the pace of the ring's slowest link."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        n = len(gpus)
        if n <= 1:
            return np.zeros_like(nbytes)
        if "all_reduce" in self.measured_kinds:
            return np.asarray(self.measured.collective_s("all_reduce", nbytes, n), dtype=np.float64)  # type: ignore[union-attr]
        nodes = self.node_of[np.asarray(gpus)]
        crosses = nodes != np.roll(nodes, -1)  # ring edge i -> i+1 leaves the node
        chunk = nbytes / n
        used_bw = ([self.intra_bytes_per_s] if (~crosses).any() else []) + ([self.nic_bytes_per_s] if crosses.any() else [])
        step_s = chunk / min(used_bw)
        if self.bridge_bytes_per_s is not None and (~crosses).any():
            # Intra-node ring edges of one node all cross that node's bridge in the same step.
            per_node = max(int(np.sum(~crosses & (nodes == node))) for node in np.unique(nodes))
            step_s = np.maximum(step_s, per_node * chunk / self.bridge_bytes_per_s)
        latency = self.nic_latency_s if crosses.any() else self.intra_latency_s
        return np.where(nbytes > 0, 2 * (n - 1) * (step_s + latency), 0.0)


def collective_kinds_used(group_gpus: int, tp: int) -> dict[str, int]:
    """The collectives a group runs and on how many GPUs: the EP all-to-all over the whole group (when it
    has more than one rank) and the TP all-reduce inside a rank (when tp > 1)."""
    used = {}
    if group_gpus // tp > 1:
        used["all_to_all"] = group_gpus
    if tp > 1:
        used["all_reduce"] = tp
    return used


def measured_collectives(
    spec: TopologySpec, profile: HardwareProfile, *, group_gpus: int, gpus_per_node: int, tp: int = 1,
    first_gpu: int = 0,
) -> frozenset[str]:
    """The collective kinds costed from the profile's tables under ``spec.collective_model``; raises
    ValueError (a sentence) when ``measured`` is asked for and a table or the one-NVLink-node setting is missing."""
    if spec.collective_model == "link":
        return frozenset()
    one_node = (first_gpu // gpus_per_node) == ((first_gpu + group_gpus - 1) // gpus_per_node)
    usable = one_node and spec.intra_node == "nvlink"
    have = set(profile.collective_kinds)
    used = collective_kinds_used(group_gpus, tp)
    if spec.collective_model == "measured":
        if not usable:
            raise ValueError(
                "measured collectives need the group on one node with intra_node: nvlink (the profile's NCCL "
                "tables were measured there); use collective_model: auto or link"
            )
        missing = [f"{kind} on {n} GPUs" for kind, n in used.items() if (kind, n) not in have]
        if missing:
            raise ValueError(
                f"profile {profile.name!r} has no measured {', '.join(missing)} (it has "
                f"{', '.join(f'{k} on {n}' for k, n in sorted(have)) or 'no collectives'}); use collective_model: auto or link"
            )
    if not usable:
        return frozenset()
    return frozenset(kind for kind, n in used.items() if (kind, n) in have)


def build_topology(
    spec: TopologySpec, profile: HardwareProfile, *, group_gpus: int, gpus_per_node: int, first_gpu: int = 0,
    tp: int = 1,
) -> Topology:
    """The topology of one group of ``group_gpus`` GPUs starting at global GPU ``first_gpu``."""
    links = profile.links
    kinds = measured_collectives(spec, profile, group_gpus=group_gpus, gpus_per_node=gpus_per_node, tp=tp,
                                 first_gpu=first_gpu)
    node_of = (first_gpu + np.arange(group_gpus)) // gpus_per_node
    node_of = node_of - node_of.min()
    if spec.intra_node == "nvlink":
        intra_bw = links.gpu_to_gpu.bandwidth_gbps * 1e9
        intra_lat = links.gpu_to_gpu.latency_s
        bridge = None
    else:
        intra_bw = (spec.pcie_gbps or links.host_to_device.bandwidth_gbps) * 1e9
        intra_lat = links.host_to_device.latency_s
        bridge = (spec.host_bridge_gbps * 1e9) if spec.host_bridge_gbps else intra_bw
    return Topology(
        node_of=node_of,
        intra_kind=spec.intra_node,
        intra_bytes_per_s=float(intra_bw),
        intra_latency_s=float(intra_lat),
        bridge_bytes_per_s=None if bridge is None else float(bridge),
        nic_bytes_per_s=float((spec.nic_gbps or links.node_to_node.bandwidth_gbps) * 1e9),
        nic_latency_s=float(spec.nic_latency_s if spec.nic_latency_s is not None else links.node_to_node.latency_s),
        measured=profile if kinds else None,
        measured_kinds=kinds,
    )


__all__ = ["Topology", "build_topology", "collective_kinds_used", "measured_collectives"]
