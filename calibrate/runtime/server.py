"""Serving a scenario's requests for real: continuous batching over real model iterations.

Batches are formed by the simulator's own ``sim.engine.replica.Replica`` (its ``form_batch``,
``_grow``, ``preempt`` and ``drop_timed_out``, with the same scheduler object), driven by a
wall clock instead of a SimPy environment, so the runtime follows exactly the simulator's rules:
decodes first, then chunked prefills, then admissions in the scheduler's order, KV blocks and
preemption. The serving loop:

    arrivals due by now are submitted -> a batch is formed -> one real iteration runs
    (per layer: attention -> gate -> cache decisions and loads -> experts; then the LM head)
    -> every sequence of the batch advances (tokens stamped with the wall clock)

Requests arrive at their ``arrival_s`` (real time from the start of serving, ``time_scale`` x), or, in a
closed loop, as earlier requests are answered (``sim.workload.closed_loop``, the simulator's own rule).

Next-layer prefetch (``policies.prefetch: {name: next_layer}``) makes the simulator's decisions
(``ExpertStore``, ``sim.policies.next_layer``); its copies run on the copy thread while the compute
thread runs the current layer's experts. The ``frequency`` predictor needs nothing but the past. The
``oracle`` predictor knows each iteration's routing before it runs, which a real system cannot: the
runtime gets it as ``oracle_routing`` (a routing trace recorded by an earlier run of the same requests,
see ``calibrate.validate``), and its gates then follow that routing (each gate is still computed; where
its own top-k differs, counted in ``RunRecorder.forced_positions``, the trace's experts are used with the
gate's probabilities for them), so the oracle is exact. Not supported: swap preemption (``CalibrationError``)."""

from __future__ import annotations

import heapq
import time
from array import array
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibrate.errors import CalibrationError
from calibrate.runtime.expert_store import ExpertStore
from calibrate.runtime.model import TinyMoE
from calibrate.runtime.recorder import RequestRecord, RunRecorder, RuntimeIteration
from calibrate.runtime.train_routers import BYTE_TOKENS
from sim.engine.memory import max_request_tokens, plan_memory
from sim.engine.replica import Replica, RequestState
from sim.policies.cache import make_cache
from sim.policies.scheduler import make_scheduler
from sim.scenario import LoadedScenario
from sim.workload.arrivals import RequestTable
from sim.workload.closed_loop import ClosedLoopIssuer


def check_device(device: str) -> str:
    """``device`` if the runtime can run there: "cpu", or "cuda" on a machine with a CUDA GPU."""
    if device == "cpu":
        return device
    if device != "cuda":
        raise CalibrationError(f"device: expected cpu or cuda, got {device!r}")
    if not torch.cuda.is_available():
        raise CalibrationError("device: cuda was asked for, but torch sees no CUDA GPU here (use --device cpu)")
    return device  # pragma: no cover - needs a GPU


class WallClock:
    """Stands in for the SimPy environment inside ``Replica``: the batching code only reads ``now``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def now(self) -> float:
        return time.perf_counter() - self.t0

    def process(self, generator: Any) -> None:
        generator.close()  # the runtime drives the replica itself; its SimPy loop never runs

    def sleep_until(self, at_s: float) -> None:
        while True:
            left = at_s - self.now
            if left <= 0:
                return
            time.sleep(left - 0.0005 if left > 0.002 else 0)  # sleep most of it, then spin to be on time


class Runtime:
    """One replica of the real model serving a request table."""

    def __init__(self, loaded: LoadedScenario, *, seed: int = 0, threads: int = 1,
                 oracle_routing: dict[int, np.ndarray] | None = None, routers: str = "auto",
                 prompts: str = "random", device: str = "cpu") -> None:
        """``routers``: see ``TinyMoE``. ``prompts``: "random" (seeded token ids over the whole vocab) or "text"
        (seeded windows of held-out standard-library source bytes, ``train_routers.held_out_files``: text
        like the trained routers learned on, so their routing shows its structure)."""
        policies = loaded.scenario.policies
        prefetch = policies.prefetch
        predictor = getattr(prefetch, "predictor", "oracle")
        if prefetch.name == "next_layer" and predictor == "oracle" and oracle_routing is None:
            raise CalibrationError(f"{loaded.source}: policies.prefetch: the oracle predictor needs the routing in "
                                   f"advance (oracle_routing, recorded by a first run; moesim validate does this)")
        if policies.preemption.mode != "recompute":
            raise CalibrationError(f"{loaded.source}: policies.preemption: the runtime supports recompute only")
        if loaded.scenario.hardware.num_gpus != 1:
            raise CalibrationError(f"{loaded.source}: hardware.num_gpus: the runtime serves one replica")
        if prompts not in ("random", "text"):
            raise CalibrationError(f"prompts: expected random or text, got {prompts!r}")
        self.loaded = loaded
        self.seed = seed
        self.threads = threads
        self.prompts = prompts
        self.prompt_text = None
        if prompts == "text":
            from calibrate.runtime.train_routers import byte_tokens, held_out_files

            self.prompt_text = byte_tokens(held_out_files())
            if loaded.model.vocab_size < BYTE_TOKENS:
                raise CalibrationError(f"{loaded.source}: prompts: text needs a vocab of at least {BYTE_TOKENS} byte tokens, "
                                       f"model {loaded.model.name} has {loaded.model.vocab_size}")
        self.budget = plan_memory(loaded)
        spec = loaded.model
        self.device = check_device(device)
        self.model = TinyMoE(spec, seed, routers, device=device)  # model.router_source: which routers route
        d = self.dims = self.model.dims
        cache_spec = policies.expert_cache
        cache = make_cache(
            cache_spec.name, num_layers=d.num_layers, num_experts=d.num_experts,
            capacity_experts=self.budget.expert_slots, per_layer=getattr(cache_spec, "scope", "global") == "per_layer",
        )
        self.store = ExpertStore(
            self.model.host_experts, cache, num_experts=d.num_experts, prefetch=prefetch.name,
            prefetch_predictor=predictor, prefetch_max_experts=getattr(prefetch, "max_experts", None) or d.top_k,
            device=device,
        )
        # request id -> experts [positions, layers, top_k] the gates follow (oracle prefetch only)
        self.oracle = oracle_routing if prefetch.name == "next_layer" and predictor == "oracle" else None
        self.expert_calls: list[tuple[int, float]] | None = None  # (tokens, seconds) per expert call, when set

    @classmethod
    def for_measurement(cls, spec: Any, *, seed: int = 0, threads: int = 1, routers: str = "auto",
                        device: str = "cpu") -> "Runtime":
        """A runtime of ``spec`` with every expert resident, for timing single iterations (``run_batch``)."""
        self = cls.__new__(cls)
        self.loaded = None
        self.seed, self.threads = seed, threads
        self.device = check_device(device)
        self.model = TinyMoE(spec, seed, routers, device=device)
        self.prompt_text = None  # run_batch draws its own context tokens
        d = self.dims = self.model.dims
        cache = make_cache("all_resident", num_layers=d.num_layers, num_experts=d.num_experts,
                           capacity_experts=d.num_layers * d.num_experts, per_layer=False)
        self.store = ExpertStore(self.model.host_experts, cache, num_experts=d.num_experts, device=device)
        self.oracle = None
        self.expert_calls = None
        self.tokens, self.kv, self.token_times = {}, {}, {}
        self.max_len = 1
        return self

    def run_batch(self, segments: list[tuple[int, int, bool]]) -> dict[str, Any]:
        """Run one real iteration of ``segments`` (context before, new tokens, is prefill), decodes first as
        ``Replica.form_batch`` orders them; return its time breakdown (``RuntimeIteration`` fields), its
        ``duration_s`` and ``counts[layer, expert]`` (tokens routed to each expert)."""
        d = self.dims
        batch = []
        self.kv = {}
        self.max_len = max(pos + n for pos, n, _ in segments) + 1
        for i, (pos, n, is_prefill) in enumerate(segments):
            req = RequestState(i, 0.0, pos + n if is_prefill else pos, 1_000_000, None)
            req.context = pos
            # The KV of the context before this iteration: seeded values (never uninitialised memory,
            # which would make the routing, and so the experts run, differ between repeats).
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            self.kv[i] = torch.randn(d.num_layers, 2, d.num_kv_heads, self.max_len, d.head_dim,
                                     generator=g).to(torch.bfloat16).to(self.device)
            rng = np.random.default_rng([self.seed, i])
            self.tokens[i] = rng.integers(0, d.vocab, pos + n).tolist()
            batch.append((req, n))
        rec = RunRecorder(num_layers=d.num_layers, top_k=d.top_k)
        self._sync()
        started = time.perf_counter()
        out = self._iteration(batch, rec, None)  # type: ignore[arg-type]
        self._sync()
        out["duration_s"] = time.perf_counter() - started
        # Tokens per (layer, expert) of this iteration, as the simulator's routing counts give them.
        counts = np.zeros((d.num_layers, d.num_experts), dtype=np.int64)
        layers = np.arange(d.num_layers)[:, None]
        for seq in rec.routing.values():
            for experts in seq.values():
                np.add.at(counts, (np.broadcast_to(layers, experts.shape), experts.astype(np.int64)), 1)
        out["counts"] = counts
        return out

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- serving

    def serve(self, table: RequestTable, *, time_scale: float = 1.0) -> RunRecorder:
        """Serve every request of ``table``; arrival i is submitted at ``table.arrival_s[i] * time_scale``, or in a
        closed loop (``table.closed_loop``) when an earlier request is answered, think times ``time_scale`` x."""
        policies = self.loaded.scenario.policies
        d = self.dims
        rec = RunRecorder(num_layers=d.num_layers, top_k=d.top_k)
        kv_limit = max_request_tokens(self.budget)
        too_long = (table.prompt_tokens + table.output_tokens) > kv_limit
        if np.any(too_long) or (not policies.batching.chunked_prefill
                                and np.any(table.prompt_tokens > policies.batching.max_batch_tokens)):
            raise CalibrationError(f"{self.loaded.source}: a request would be rejected; the runtime serves "
                                   f"workloads whose requests all fit")
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                self._warm_up()
                return self._serve(table, time_scale, rec)
        finally:
            torch.set_num_threads(previous_threads)

    def _serve(self, table: RequestTable, time_scale: float, rec: RunRecorder) -> RunRecorder:
        policies = self.loaded.scenario.policies
        clock = WallClock()
        self.token_times: dict[int, list[float]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.kv: dict[int, torch.Tensor] = {}
        n_total = len(table)
        self.max_len = int((table.prompt_tokens + table.output_tokens).max()) if n_total else 1
        finished: list[RequestState] = []

        # Requests waiting to be sent, as a heap of (send time, id): the whole table for arrivals known in
        # advance; in a closed loop the first clients', then one more per answer (sim.workload.closed_loop).
        issuer = None if table.closed_loop is None else ClosedLoopIssuer(table.closed_loop, n_total)
        if issuer is None:
            pending = [(float(at), i) for i, at in enumerate(table.arrival_s * time_scale)]  # sorted: a heap
        else:
            pending = [(at, i) for i, at in issuer.initial()]

        def on_finish(req: RequestState) -> None:
            finished.append(req)
            if issuer is not None:
                nxt = issuer.after_finish(req.finished_at_s, think_scale=time_scale)
                if nxt is not None:
                    heapq.heappush(pending, (nxt[1], nxt[0]))
            self.kv.pop(req.request_id, None)
            rec.requests.append(RequestRecord(
                request_id=req.request_id, arrived_at_s=req.arrival_s, prompt_tokens=req.prompt_tokens,
                output_tokens=req.output_tokens, generated_tokens=req.generated, status=req.status,
                admitted_at_s=req.admitted_at_s, first_token_at_s=req.first_token_at_s,
                finished_at_s=req.finished_at_s, preemptions=req.preemptions,
                token_times_s=tuple(self.token_times.get(req.request_id, ())),
            ))

        replica = Replica(
            index=0, env=clock, budget=self.budget, planner=None, routing=None,  # type: ignore[arg-type]
            scheduler=make_scheduler(policies.scheduler.name), profile=None,  # type: ignore[arg-type]
            max_num_seqs=policies.batching.max_num_seqs, max_batch_tokens=policies.batching.max_batch_tokens,
            chunked_prefill=policies.batching.chunked_prefill, preemption=policies.preemption.mode,
            queue_timeout_s=policies.batching.queue_timeout_s, on_finish=on_finish, tbt_samples=array("d"),
        )
        while len(finished) < n_total:
            now = clock.now
            while pending and pending[0][0] <= now:
                at, i = heapq.heappop(pending)
                req = RequestState(i, at, int(table.prompt_tokens[i]), int(table.output_tokens[i]), None)
                self.tokens[i] = self._prompt(i, req.prompt_tokens)
                self.token_times[i] = []
                replica.submit(req)
            replica.drop_timed_out(now)
            if not replica.running and not replica.waiting:
                clock.sleep_until(pending[0][0])
                continue
            batch, swap_out, swap_in = replica.form_batch()
            assert not swap_out and not swap_in, "recompute preemption never swaps"
            if not batch:
                if not replica.running:
                    raise RuntimeError("replica idle with waiting requests that cannot be admitted")
                replica.preempt(replica.running[replica.scheduler.choose_victim(replica.running)])
                continue
            started = clock.now
            it = self._iteration(batch, rec, clock)
            now = clock.now
            rec.iterations.append(RuntimeIteration(started_at_s=started, duration_s=now - started, **it))
            replica.advance(batch, now, on_token=lambda req: self.token_times[req.request_id].append(now))
        self.store.close()
        return rec

    def _prompt(self, request_id: int, tokens: int) -> list[int]:
        """Request ``request_id``'s prompt: seeded random ids, or a seeded window of the text."""
        rng = np.random.default_rng([self.seed, request_id])
        if self.prompt_text is None:
            return rng.integers(0, self.dims.vocab, tokens).tolist()
        start = int(rng.integers(0, len(self.prompt_text) - tokens))
        return self.prompt_text[start : start + tokens].astype(np.int64).tolist()

    # ---------------------------------------------------------------- one iteration

    def _kv_of(self, req: RequestState) -> torch.Tensor:
        kv = self.kv.get(req.request_id)
        if kv is None:
            d = self.dims
            # Every request gets the longest request's room, so decode batches can slice a common length.
            # Zeroed, not empty: a decode batch reads past a shorter sequence's end (masked out), and
            # SDPA multiplies those values by a zero weight, so uninitialised NaNs would turn into NaN
            # hidden states and garbage routing.
            kv = torch.zeros(d.num_layers, 2, d.num_kv_heads, self.max_len, d.head_dim, dtype=torch.bfloat16,
                             device=self.device)
            self.kv[req.request_id] = kv
        return kv

    def _sync(self) -> None:
        """On CUDA, wait for the GPU before reading the clock, so each phase's time is its own."""
        if self.device != "cpu":  # pragma: no cover - needs a GPU
            torch.cuda.synchronize()

    def _iteration(self, batch: list[tuple[RequestState, int]], rec: RunRecorder, clock: WallClock) -> dict[str, Any]:
        sync = self._sync

        def perf() -> float:
            sync()
            return time.perf_counter()

        dev = self.device
        t_start = perf()
        m, d, store = self.model, self.dims, self.store
        hq, hkv, hd = d.num_heads, d.num_kv_heads, d.head_dim
        gqa = hq != hkv
        # Segments in batch order: (request, first position, tokens, row offset, emits a token?).
        segs = []
        ids: list[int] = []
        for req, n in batch:
            pos = req.context
            emitting = (not req.in_prefill) or pos + n >= req.prefill_target
            segs.append((req, pos, n, len(ids), emitting, req.in_prefill, self._kv_of(req)))
            ids.extend(self.tokens[req.request_id][pos : pos + n])
        T = len(ids)
        decodes = [s for s in segs if not s[5]]
        prefills = [s for s in segs if s[5]]
        dec_rows = torch.tensor([s[3] for s in decodes], dtype=torch.long, device=dev)
        dec_pos = [s[1] for s in decodes]
        dec_len = max(dec_pos) + 1 if decodes else 0
        dec_mask = None
        if decodes and min(dec_pos) != max(dec_pos):
            dec_mask = (torch.arange(dec_len, device=dev)[None, :] <= torch.tensor(dec_pos, device=dev)[:, None]).view(
                len(decodes), 1, 1, dec_len)
        routing = np.empty((T, d.num_layers, d.top_k), dtype=np.int16)
        gates = np.empty((T, d.num_layers, d.top_k), dtype=np.float32)
        forced = None
        counts = None
        if self.oracle is not None:
            forced = np.concatenate([self.oracle[s[0].request_id][s[1] : s[1] + s[2]] for s in segs]).astype(np.int64)
            if forced.shape[0] != T:
                raise CalibrationError("oracle routing: a request of this batch has no routing for its positions")
            counts = np.zeros((d.num_layers, d.num_experts), dtype=np.int64)
            np.add.at(counts, (np.broadcast_to(np.arange(d.num_layers)[None, :, None], forced.shape), forced), 1)
        used = np.zeros((d.num_layers, d.num_experts), dtype=np.int64)
        store.begin_iteration(counts)
        x = m.embed[torch.tensor(ids, dtype=torch.long, device=dev)]
        attention_s = gate_s = expert_s = wait_s = 0.0
        hits = misses = bypassed = prefetch_hits = 0
        for layer, w in enumerate(m.layers):
            t0 = perf()
            h = m.rms_norm(x, w["norm1"])
            q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
            for req, pos, n, row, _, _, kv in segs:
                kv[layer, 0, :, pos : pos + n] = k[row : row + n].view(n, hkv, hd).transpose(0, 1)
                kv[layer, 1, :, pos : pos + n] = v[row : row + n].view(n, hkv, hd).transpose(0, 1)
            outs = []
            if decodes:
                qd = q[dec_rows].view(len(decodes), hq, 1, hd)
                kd = torch.stack([s[6][layer, 0, :, :dec_len] for s in decodes])
                vd = torch.stack([s[6][layer, 1, :, :dec_len] for s in decodes])
                o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dec_mask, enable_gqa=gqa)
                outs.append(o.reshape(len(decodes), hq * hd))
            for req, pos, n, row, _, _, kv in prefills:
                qp = q[row : row + n].view(n, hq, hd).transpose(0, 1).unsqueeze(0)
                kp = kv[layer, 0, :, : pos + n].unsqueeze(0)
                vp = kv[layer, 1, :, : pos + n].unsqueeze(0)
                if pos == 0:
                    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
                else:
                    mask = torch.arange(pos + n, device=dev)[None, :] <= (pos + torch.arange(n, device=dev))[:, None]
                    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)
                outs.append(o.squeeze(0).transpose(0, 1).reshape(n, hq * hd))
            # Decodes come first in a batch (Replica.form_batch), so rows are already in token order.
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + attn @ w["wo"]
            t1 = perf()
            h2 = m.rms_norm(x, w["norm2"])
            if forced is None:
                idx, weights = m.route(layer, h2)
                idx_np = idx.cpu().numpy()
            else:
                idx_np = forced[:, layer, :]
                weights, own = m.route_forced(layer, h2, torch.from_numpy(idx_np).to(dev))
                rec.forced_positions += int(own)
            routing[:, layer, :] = idx_np
            gates[:, layer, :] = weights.float().cpu().numpy()
            experts = np.unique(idx_np).tolist()
            used[layer, experts] = 1
            access = store.access(layer, experts)
            hits += access.num_hits
            prefetch_hits += len(access.prefetched)
            misses += len(access.misses)
            bypassed += access.bypassed
            t2 = perf()
            gate_s += t2 - t1
            attention_s += t1 - t0
            y = torch.zeros_like(h2)
            # Shared experts: every token, no routing, no load; they run while this layer's loads (just issued)
            # are in flight, as the simulator's planner orders them.
            for wg, wu, wd in w["shared"]:
                y += m.expert_ffn(h2, wg, wu, wd)
            expert_s += perf() - t2
            base = layer * d.num_experts
            for e in access.hits:
                expert_s += self._run_expert(h2, y, idx_np, weights, e, store.weights(base + e))
            # Prefetched, then missed experts, each as its load (FIFO on the copy thread) finishes.
            for e, job in (*access.prefetched, *access.misses):
                tw = perf()
                job.wait()
                wait_s += perf() - tw
                expert_s += self._run_expert(h2, y, idx_np, weights, e, job.dst)
            x = x + y
        t_lm = perf()
        emit = [s for s in segs if s[4]]
        if emit:
            rows = torch.tensor([s[3] + s[2] - 1 for s in emit], dtype=torch.long, device=dev)
            logits = m.rms_norm(x[rows], m.final_norm) @ m.lm_head
            if self.prompt_text is not None:  # text prompts: generate within the byte tokens the routers know
                logits = logits[:, :BYTE_TOKENS]
            next_ids = torch.argmax(logits, dim=-1).tolist()
            for s, tok in zip(emit, next_ids):
                self.tokens[s[0].request_id].append(int(tok))
        lm_head_s = perf() - t_lm
        # Prefetches no layer waited for still hold the iteration open (the simulator's time_plan).
        wait_s += store.end_iteration(used)
        copy_s = store.copy_seconds()
        dispatch_s = store.dispatch_seconds()
        for req, pos, n, row, _, _, _ in segs:
            rec.record_routing(req.request_id, pos, routing[row : row + n], gates[row : row + n])
        rec.batches.append(tuple((s[0].request_id, s[1], s[2], s[5], s[4]) for s in segs))
        total = perf() - t_start
        return dict(
            num_prefill_seqs=len(prefills), num_decode_seqs=len(decodes), num_tokens=T, expert_hits=hits,
            expert_misses=misses, bypassed=bypassed, prefetch_hits=prefetch_hits, attention_s=attention_s, gate_s=gate_s,
            expert_compute_s=expert_s, load_wait_s=wait_s, copy_busy_s=copy_s, copy_dispatch_s=dispatch_s, lm_head_s=lm_head_s,
            other_s=max(0.0, total - attention_s - gate_s - expert_s - wait_s - lm_head_s),
        )

    def _run_expert(self, h: torch.Tensor, y: torch.Tensor, idx_np: np.ndarray, weights: torch.Tensor, e: int,
                    flat: torch.Tensor) -> float:
        self._sync()
        t0 = time.perf_counter()
        rows, slot = np.nonzero(idx_np == e)
        rows_t = torch.from_numpy(rows).to(self.device)
        wg, wu, wd = self.model.expert_views(flat)
        out = self.model.expert_ffn(h[rows_t], wg, wu, wd)
        y.index_add_(0, rows_t, out * weights[rows_t, torch.from_numpy(slot).to(self.device)].unsqueeze(1))
        self._sync()
        seconds = time.perf_counter() - t0
        if self.expert_calls is not None:
            self.expert_calls.append((len(rows), seconds))
        return seconds

    def _warm_up(self) -> None:
        """Run each kind of kernel once at a few sizes so first-call costs stay out of the run."""
        m, d = self.model, self.dims
        for t in (1, 4, 16, 64):
            h = torch.randn(t, d.hidden).to(torch.bfloat16).to(self.device)
            w = m.layers[0]
            _ = h @ w["wq"], h @ w["wk"], m.route(0, h), m.rms_norm(h, w["norm1"]) @ m.lm_head
            _ = m.expert_ffn(h, *m.expert_views(m.host_experts[0].to(self.device)))
            _ = [m.expert_ffn(h, *shared) for shared in w["shared"]]
            q = torch.randn(1, d.num_heads, t, d.head_dim).to(torch.bfloat16).to(self.device)
            kv = torch.randn(1, d.num_kv_heads, t, d.head_dim).to(torch.bfloat16).to(self.device)
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=d.num_heads != d.num_kv_heads)
