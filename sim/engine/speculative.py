"""Speculative decoding (SpecMoEOff, PAPERS.md section 2): draft k tokens, verify k+1 in one target pass.

Per decode step of a sequence with ``c`` tokens in its KV cache and ``r`` output tokens still to go:

* the draft length is ``k_i = min(k, r - 1)`` (drafting past the end of the output is pointless), cut
  further by the batch token budget: the ``k_i + 1`` verified positions count against
  ``policies.batching.max_batch_tokens``. Decodes are scheduled first, in running order; the budget keeps
  one token for each decode still to come this step (the plain engine's set of decodes is scheduled
  unchanged), and a sequence gets ``min(k_i, budget left - 1 - decodes still to come)`` drafts verified,
  down to 0 (a plain decode step). The draft model drafted the full ``k_i`` at the end of the previous step
  (it cannot know the next batch), so drafts cut here were drafted but are not verified;
* the target verifies ``k_i + 1`` tokens (the last emitted token and the k_i drafts) at positions
  ``c .. c + k_i`` in the same pass as every other sequence of the batch, so each loaded expert serves
  more tokens; the routing source draws the experts of all ``k_i + 1`` positions;
* the draft model then drafts the next step's tokens: one pass over the tokens emitted this step (its
  KV catches up), then one pass per further draft token (``k`` passes in all for the batch);
* ``A`` drafted tokens are accepted (drawn per token from the acceptance model, seeded), and the
  target's own token at the first rejection (or after the last draft) is emitted too: ``A + 1`` tokens.
  The KV cache grows by ``A + 1``; blocks for ``k_i + 1`` tokens are allocated before the pass (vLLM's
  lookahead slots), so at most ``k`` tokens' worth stay allocated ahead.

Time between tokens, defined per emitted token as the time since the previous token of the same
request reached the client: the ``A + 1`` tokens of one step arrive together, so the first has the
step's gap and the others 0. TTFT is unchanged (prefill emits one token); TPOT = (finish - first token) /
(output - 1) counts every token. With ``k = 0`` every step is a plain decode step, and the replica makes
exactly the plain engine's decisions, draws and timings (a test checks this)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.engine.iteration import BatchShape, IterationPlanner, time_plan
from sim.engine.replica import IterationRecord, Replica, RequestState
from sim.errors import ScenarioError
from sim.policies.cache import make_cache
from sim.policies.offload_specs import (
    EmpiricalAcceptance,
    FixedAcceptance,
    PerTaskAcceptance,
    SpeculativeSpec,
)
from sim.profile import HardwareProfile
from sim.spec import ModelSpec, get_model


# ---------------------------------------------------------------- acceptance


class AcceptanceModel:
    """How many of ``k`` drafted tokens the target accepts, drawn from a seeded Generator."""

    def __init__(self, spec: FixedAcceptance | PerTaskAcceptance | EmpiricalAcceptance, rng: np.random.Generator,
                 run_lengths: np.ndarray | None = None) -> None:
        """``run_lengths``: an empirical spec's lengths when they come from a file (``read_run_lengths``)."""
        self.spec = spec
        self.rng = rng
        self._run_lengths = None
        if isinstance(spec, EmpiricalAcceptance):
            self._run_lengths = np.asarray(spec.run_lengths if run_lengths is None else run_lengths, dtype=np.int64)

    def rate(self, task: str | None) -> float | None:
        """Per-token rate of a request (None for an empirical distribution)."""
        if isinstance(self.spec, FixedAcceptance):
            return self.spec.rate
        if isinstance(self.spec, PerTaskAcceptance):
            return self.spec.rates.get(task, self.spec.default_rate) if task is not None else self.spec.default_rate
        return None

    def draw(self, tasks: list[str | None], drafts: np.ndarray) -> np.ndarray:
        """Accepted drafts per sequence (``0 <= accepted <= drafts``); sequences with 0 drafts draw nothing."""
        drafts = np.asarray(drafts, dtype=np.int64)
        out = np.zeros(len(drafts), dtype=np.int64)
        active = np.flatnonzero(drafts > 0)
        if not len(active):
            return out
        if self._run_lengths is not None:
            picks = self._run_lengths[self.rng.integers(0, len(self._run_lengths), size=len(active))]
            out[active] = np.minimum(picks, drafts[active])
            return out
        kmax = int(drafts[active].max())
        rates = np.asarray([self.rate(tasks[i]) for i in active], dtype=np.float64)
        # Token j is accepted only if tokens 0..j-1 were: the accepted count is the leading run of successes.
        success = self.rng.random((len(active), kmax)) < rates[:, None]
        success &= np.arange(kmax)[None, :] < drafts[active][:, None]
        out[active] = np.cumprod(success, axis=1).sum(axis=1)
        return out


def expected_emitted_tokens(rate: float, k: int) -> float:
    """Mean tokens emitted per verification step with per-token acceptance ``rate``: sum_{i=0..k} rate^i."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def read_run_lengths(spec: EmpiricalAcceptance, base_dir: Path, source: str) -> np.ndarray:
    """An empirical acceptance's run lengths, inline or read from its file; ScenarioError naming the line."""
    if spec.run_lengths is not None:
        return np.asarray(spec.run_lengths, dtype=np.int64)
    assert spec.path is not None
    file = base_dir / spec.path
    where = f"{source}: policies.speculative.acceptance.path"
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ScenarioError(f"{where}: cannot read {file}: {exc.strerror or exc}") from None
    values = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not text.isdigit():
            raise ScenarioError(f"{file}:{number}: expected a whole number >= 0 (an accepted run length); got {text!r}")
        values.append(int(text))
    if not values:
        raise ScenarioError(f"{where}: {file} holds no run lengths")
    return np.asarray(values, dtype=np.int64)


def mean_emitted_tokens(spec: FixedAcceptance | PerTaskAcceptance | EmpiricalAcceptance, k: int,
                        task_mix: dict[str, float] | None = None, run_lengths: np.ndarray | None = None) -> float:
    """Mean tokens emitted per verification step with draft length ``k`` (per-task rates weighted by the mix)."""
    if isinstance(spec, FixedAcceptance):
        return expected_emitted_tokens(spec.rate, k)
    if isinstance(spec, PerTaskAcceptance):
        if not task_mix:
            return expected_emitted_tokens(spec.default_rate, k)
        total = sum(task_mix.values())
        return sum(w / total * expected_emitted_tokens(spec.rates.get(t, spec.default_rate), k) for t, w in task_mix.items())
    runs = np.asarray(spec.run_lengths if run_lengths is None else run_lengths, dtype=np.float64)
    return float(np.minimum(runs, k).mean()) + 1.0


# ---------------------------------------------------------------- the verify pass on the plain planner


@dataclass(frozen=True, slots=True)
class VerifyBatchShape(BatchShape):
    """A batch whose decoding sequences verify drafts: ``verify_query_tokens[i]`` tokens (k_i + 1 >= 2)
    of a sequence with ``verify_context_tokens[i]`` cached tokens. Plain decodes (k_i = 0) stay decodes."""

    verify_context_tokens: np.ndarray = None  # type: ignore[assignment]
    verify_query_tokens: np.ndarray = None  # type: ignore[assignment]

    @property
    def num_tokens(self) -> int:
        return (int(self.prefill_new_tokens.sum()) + len(self.decode_context_tokens)
                + int(self.verify_query_tokens.sum()))


def verify_attention_s(profile: HardwareProfile, *, context_tokens: np.ndarray, query_tokens: np.ndarray, shape,
                       chunked: bool = False) -> float:
    """Attention core of one verification pass of a batch, from the profile's measured kernels: a sequence
    with one query is a decode step (one batched ``attention_decode`` call for all of them, as in the plain
    engine); a sequence verifying ``q >= 2`` tokens is a chunk of ``q`` queries over its cached prefix, the
    work ``attention_prefill`` measures (SpecMoEOff's chunked kernel reads the KV once: the same roofline).
    ``chunked``: single queries are chunks too (a GEMM-based CPU kernel, one call per sequence)."""
    ctx = np.asarray(context_tokens, dtype=np.int64)
    q = np.asarray(query_tokens, dtype=np.int64)
    one = (q == 1) & (not chunked)
    seconds = 0.0
    if one.any():
        seconds += float(profile.attention_decode_s(context_tokens=ctx[one], shape=shape))
    if (~one).any():
        seconds += float(np.sum(profile.attention_prefill_s(new_tokens=q[~one], context_tokens=ctx[~one], shape=shape)))
    return seconds


class VerifyIterationPlanner(IterationPlanner):
    """The plain two-resource planner, with verification attention (``verify_attention_s``) for verifying sequences."""

    def _attention_core_s(self, batch: BatchShape, sliding: bool) -> float:
        seconds = super()._attention_core_s(batch, sliding)
        if isinstance(batch, VerifyBatchShape) and len(batch.verify_context_tokens):
            ctx = batch.verify_context_tokens
            if sliding and self.sliding_window:
                ctx = np.minimum(ctx, self.sliding_window)
            seconds += verify_attention_s(self.profile, context_tokens=ctx, query_tokens=batch.verify_query_tokens,
                                          shape=self.attention_shape)
        return seconds


# ---------------------------------------------------------------- the draft model


def resolve_draft_model(spec: SpeculativeSpec, source: str) -> ModelSpec:
    from sim.errors import CatalogError

    if spec.draft_model.spec is not None:
        return spec.draft_model.spec
    try:
        return get_model(spec.draft_model.name or "")
    except CatalogError as exc:
        raise ScenarioError(f"{source}: policies.speculative.draft_model.name: {exc}") from None


@dataclass(frozen=True, slots=True)
class SplitBatchShape(BatchShape):
    """A draft pass whose arrays describe the GPU part only; ``host_tokens`` more tokens (the host part,
    attending on the CPU) still go through the GPU's projections and FFN."""

    host_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.prefill_new_tokens.sum()) + len(self.decode_context_tokens) + self.host_tokens


class DraftCost:
    """Seconds the draft model spends per step, from its profile (GPU or host CPU) like any model.

    Every draft weight is resident where it runs (SpecMoEOff keeps the EAGLE head on the GPU); a MoE draft
    spreads its tokens evenly over its experts (only their compute time matters when nothing is loaded).
    ``host_attention`` (a ``sim.engine.draft_kv.HostDraftAttention``) with ``gpu_kv_fraction < 1``: the draft's
    KV is split by batch and the host part attends on the CPU (``sim.engine.draft_kv``)."""

    def __init__(self, model: ModelSpec, profile: HardwareProfile, host_attention=None,
                 gpu_kv_fraction: float = 1.0) -> None:
        self.model = model
        self.host_attention = host_attention if gpu_kv_fraction < 1.0 else None
        self.gpu_kv_fraction = gpu_kv_fraction
        cache = make_cache("all_resident", num_layers=model.num_moe_layers, num_experts=model.num_experts,
                           capacity_experts=model.num_moe_layers * model.num_experts, per_layer=False)
        self.planner = IterationPlanner(model=model, profile=profile, cache=cache)

    def _counts(self, tokens: int) -> np.ndarray:
        m = self.model
        per_expert = -(-tokens * m.top_k // m.num_experts)
        return np.full((m.num_moe_layers, m.num_experts), min(per_expert, tokens), dtype=np.int64)

    def split(self, context_tokens: np.ndarray) -> np.ndarray:
        """True for the sequences whose draft KV is on the host (none without a split)."""
        if self.host_attention is None:
            return np.zeros(len(context_tokens), dtype=bool)
        from sim.engine.draft_kv import split_by_batch

        return split_by_batch(context_tokens, self.gpu_kv_fraction)

    def _pass_s(self, shape: BatchShape, host_ctx: np.ndarray | None = None, host_q: np.ndarray | None = None) -> float:
        """One pass; ``host_ctx``/``host_q``: the host part's sequences (cached tokens, queries), not in ``shape``."""
        if host_q is not None and len(host_q):
            gpu = SplitBatchShape(shape.prefill_new_tokens, shape.prefill_context_tokens, shape.decode_context_tokens,
                                  shape.num_emitting, host_tokens=int(host_q.sum()))
            seconds = time_plan(self.planner.plan(gpu, self._counts(gpu.num_tokens))).duration_s
            core = {flag: self.planner._attention_core_s(gpu, sliding=flag) for flag in (False, True)}
            return seconds + self.host_attention.extra_s(core, host_ctx, host_q)
        if shape.num_tokens == 0:
            return 0.0
        return time_plan(self.planner.plan(shape, self._counts(shape.num_tokens))).duration_s

    def step_s(
        self, *, prefill_new: np.ndarray, prefill_ctx: np.ndarray, catchup_ctx: np.ndarray,
        catchup_tokens: np.ndarray, next_ctx: np.ndarray, next_drafts: np.ndarray,
        catchup_host: np.ndarray | None = None, next_host: np.ndarray | None = None,
    ) -> float:
        """One step of the draft after a verification. First pass: the draft prefills the target's prompt chunks
        and catches up on the tokens each decoding sequence just emitted (``catchup_tokens`` at ``catchup_ctx``, a
        chunk like a prefill), which drafts every sequence's first token; then one single-token pass per further
        draft token: pass j runs the sequences with ``next_drafts > j`` at context ``next_ctx + j - 1``.
        ``catchup_host``/``next_host``: which of those sequences keep their draft KV on the host (default none)."""
        empty = np.zeros(0, dtype=np.int64)
        if not len(prefill_new) and not len(catchup_tokens):
            return 0.0
        c_host = np.zeros(len(catchup_tokens), bool) if catchup_host is None else np.asarray(catchup_host, bool)
        n_host = np.zeros(len(next_ctx), bool) if next_host is None else np.asarray(next_host, bool)
        first = BatchShape(
            prefill_new_tokens=np.concatenate([prefill_new, catchup_tokens[~c_host]]).astype(np.int64),
            prefill_context_tokens=np.concatenate([prefill_ctx, catchup_ctx[~c_host]]).astype(np.int64),
            decode_context_tokens=empty, num_emitting=int(np.count_nonzero(next_drafts)),
        )
        seconds = self._pass_s(first, catchup_ctx[c_host].astype(np.int64), catchup_tokens[c_host].astype(np.int64))
        for j in range(1, int(next_drafts.max()) if len(next_drafts) else 0):
            still = next_drafts > j
            ctx = (next_ctx[still] + j - 1).astype(np.int64)
            on_host = n_host[still]
            seconds += self._pass_s(BatchShape(empty, empty, ctx[~on_host], int(still.sum())),
                                    ctx[on_host], np.ones(int(on_host.sum()), dtype=np.int64))
        return seconds


# ---------------------------------------------------------------- the replica


class SpecReplica(Replica):
    """A replica whose decoding sequences draft and verify; see the module docstring for the accounting.

    ``pipelined`` (a ``sim.engine.host_compute.PipelinedIteration``) replaces the two-resource planner when
    attention or experts run on the CPU, or micro-batches pipeline the layers."""

    def __init__(self, *, draft_length: int, acceptance: AcceptanceModel | None, draft: DraftCost | None,
                 pipelined=None, **kwargs) -> None:
        self.draft_length = draft_length
        self.acceptance = acceptance
        self.draft = draft
        self.pipelined = pipelined
        self.step_records: list[tuple] = []
        super().__init__(**kwargs)

    def draft_tokens(self, req: RequestState) -> int:
        return max(0, min(self.draft_length, req.output_tokens - req.generated - 1))

    def form_batch(self):
        # Decodes the plain engine would schedule this step (each needs at least its one token).
        decoding = sum(1 for r in self.running if not r.in_prefill)
        self._decodes_to_come = min(decoding, self.max_num_seqs, self.max_batch_tokens)
        self._step_drafts: dict[int, int] = {}
        return super().form_batch()

    def _decode_step_tokens(self, req: RequestState, budget: int) -> int:
        """The k_i + 1 positions a decode verifies, counted against max_batch_tokens: the budget first keeps
        one token for every decode still to come this step (so every sequence the plain engine would schedule
        is scheduled), and a sequence whose drafts do not fit the rest verifies fewer of them, down to 0."""
        self._decodes_to_come -= 1
        k_i = min(self.draft_tokens(req), max(0, budget - 1 - self._decodes_to_come))
        self._step_drafts[req.request_id] = k_i
        return 1 + k_i

    def _run_iteration(self, batch, swap_out: float, swap_in: float, preempted: int):
        env = self.env
        started = env.now
        prefill_new, prefill_ctx, decode_ctx, verify_ctx, verify_q, segments = [], [], [], [], [], []
        drafts = np.zeros(len(batch), dtype=np.int64)
        emitting = 0
        for i, (req, n) in enumerate(batch):
            if req.in_prefill:
                segments.append((req.request_id, req.context, n))
                prefill_new.append(n)
                prefill_ctx.append(req.context)
                if req.context + n >= req.prefill_target:
                    emitting += 1
                continue
            k_i = self._step_drafts[req.request_id]
            drafts[i] = k_i
            segments.append((req.request_id, req.context, k_i + 1))
            emitting += k_i + 1  # the LM head scores every verified position
            if k_i:
                verify_ctx.append(req.context)
                verify_q.append(k_i + 1)
            else:
                decode_ctx.append(req.context)
        as_array = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        parts = dict(prefill_new_tokens=as_array(prefill_new), prefill_context_tokens=as_array(prefill_ctx),
                     decode_context_tokens=as_array(decode_ctx), num_emitting=emitting)
        shape = (VerifyBatchShape(**parts, verify_context_tokens=as_array(verify_ctx), verify_query_tokens=as_array(verify_q))
                 if verify_q else BatchShape(**parts))
        swap_s = self._swap_s(swap_out, swap_in)
        if self.pipelined is None:
            counts = self.routing.counts(segments)
            plan = self.planner.plan(shape, counts, start_offset_s=swap_s)
            timing = time_plan(plan)
            if plan.accesses:
                self.accesses.extend(plan.accesses)
            target_s, compute_s, copy_s, stall_s, loads = (timing.duration_s, timing.compute_busy_s,
                                                           timing.copy_busy_s, timing.stall_s, timing.loads)
            hits, misses, prefetch_hits = plan.hits, plan.misses, plan.prefetch_hits
            breakdown = _plain_breakdown(plan)
        else:
            step = self.pipelined.run(batch, segments, drafts, self.routing, swap_s)
            target_s, compute_s, copy_s, stall_s, loads = (step.duration_s, step.gpu_busy_s, step.copy_busy_s,
                                                           0.0, step.loads)
            hits, misses, prefetch_hits = step.hits, step.misses, 0
            breakdown = step.breakdown
        # Accepted drafts, drawn before the draft model's cost (which depends on them).
        decoding = drafts > 0
        accepted = (self.acceptance.draw([req.task for req, _ in batch], drafts)
                    if self.acceptance is not None and decoding.any() else np.zeros(len(batch), dtype=np.int64))
        draft_s = 0.0
        if self.draft is not None and self.draft_length > 0:
            draft_s = self._draft_s(batch, accepted)
        duration = target_s + draft_s
        yield env.timeout(duration)
        now = env.now
        self.iterations.append(
            IterationRecord(
                replica=self.index, started_at_s=started, duration_s=duration,
                num_prefill_seqs=len(prefill_new), num_decode_seqs=len(decode_ctx) + len(verify_ctx),
                num_tokens=shape.num_tokens, expert_hits=hits, expert_misses=misses, prefetch_hits=prefetch_hits,
                expert_loads=loads, stall_s=stall_s, compute_busy_s=compute_s, copy_busy_s=copy_s,
                kv_blocks_used=self.budget.kv_blocks - self.free_blocks,
                experts_resident=self.planner.cache.num_resident, preemptions=preempted,
            )
        )
        emitted = self._advance_spec(batch, accepted, now)
        self.step_records.append((int(drafts.sum()), int(accepted.sum()), emitted, draft_s, *breakdown))

    def _draft_s(self, batch, accepted: np.ndarray) -> float:
        """The draft model's step after verification: prefill what the target prefilled, catch up on the emitted
        tokens, and draft the tokens of every sequence's next verification."""
        prefill_new, prefill_ctx, catch_ctx, catch_tokens, next_ctx, next_drafts = [], [], [], [], [], []
        catching_up: list[bool] = []  # per next_* entry: does it also catch up (a decoding sequence)?
        for (req, n), a in zip(batch, accepted.tolist()):
            if req.in_prefill:
                if req.output_tokens < 2:
                    continue  # one output token: the target alone produces it, nothing is ever drafted
                prefill_new.append(n)
                prefill_ctx.append(req.context)
                if req.context + n >= req.prefill_target:  # the prompt is done: its first verification is next
                    next_ctx.append(req.context + n)
                    next_drafts.append(max(0, min(self.draft_length, req.output_tokens - req.generated - 2)))
                    catching_up.append(False)
                continue
            emitted = a + 1
            k_next = max(0, min(self.draft_length, req.output_tokens - req.generated - emitted - 1))
            if not k_next:
                continue  # finished, or its last step needs no draft
            catch_ctx.append(req.context)
            catch_tokens.append(emitted)
            next_ctx.append(req.context + emitted)
            next_drafts.append(k_next)
            catching_up.append(True)
        as_array = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        assert self.draft is not None
        next_host = self.draft.split(as_array(next_ctx))
        return self.draft.step_s(prefill_new=as_array(prefill_new), prefill_ctx=as_array(prefill_ctx),
                                 catchup_ctx=as_array(catch_ctx), catchup_tokens=as_array(catch_tokens),
                                 next_ctx=as_array(next_ctx), next_drafts=as_array(next_drafts),
                                 catchup_host=next_host[np.asarray(catching_up, dtype=bool)], next_host=next_host)

    def _advance_spec(self, batch, accepted: np.ndarray, now: float) -> int:
        """Advance every sequence; a verifying sequence emits its accepted drafts plus one token together."""
        emitted_total = 0
        for (req, n), a in zip(batch, accepted.tolist()):
            if req.in_prefill or a == 0:
                # Prefill chunks and steps that emit one token: exactly the plain engine's bookkeeping.
                before = req.generated
                self.advance([(req, n)], now)
                emitted_total += req.generated - before
                continue
            m = a + 1
            req.context += m
            req.generated += m
            emitted_total += m
            gap = now - req.last_token_at_s
            self.tbt_samples.append(gap)
            for _ in range(m - 1):
                self.tbt_samples.append(0.0)  # delivered in the same step as the token before
            if gap > req.max_tbt_s:
                req.max_tbt_s = gap
            req.last_token_at_s = now
            if req.generated >= req.output_tokens:
                self.running.remove(req)
                self._release(req)
                self._finish(req, "completed", "", now)
        return emitted_total


def _plain_breakdown(plan) -> tuple[float, float, float, float, float, float]:
    """(weights H2D, GPU MoE, GPU other, CPU attention, CPU experts, activation transfers) of a two-resource plan."""
    moe = other = 0.0
    for seconds, kind in zip(plan.op_s, plan.op_kind):
        if kind in ("experts", "expert"):
            moe += seconds
        else:
            other += seconds
    return (float(sum(plan.load_s)), moe, other, 0.0, 0.0, 0.0)


BREAKDOWN_COLUMNS = ("h2d_weights_s", "gpu_moe_s", "gpu_other_s", "cpu_attention_s", "cpu_experts_s", "act_transfer_s")
STEP_COLUMNS = ("drafted_tokens", "accepted_tokens", "emitted_tokens", "draft_s", *BREAKDOWN_COLUMNS)
