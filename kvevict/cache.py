"""``EvictionCache``: a transformers ``Cache`` that physically evicts KV entries.

A cache is a list of :class:`EvictingLayer` (transformers' layered cache contract). Each layer keeps
the logical number of tokens it has seen apart from the entries it stores, so ``get_seq_length``
tells ``generate`` the truth (multi-turn reuse feeds only new tokens; RoPE positions stay right).
Eviction runs after attention (``update`` must return every key the current queries may see), in
every forward pass: chunked prefill and decoding alike, once a head holds more than
``budget + slack`` entries.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import ATTN_IMPLEMENTATION, KVMask, hand_over, register
from .compat import attention_input, attention_modules
from .modality import ModalityMap, image_token_id
from .policy import Budget, Policy, resolve_policy
from .scoring import ScoreInputs
from .selection import SelectionInputs
from .storage import HeadwiseKV

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
DEFERRED_OBSERVE_TOKENS = 16  # forward passes up to this size may defer scoring (scorers that score late)
DEFERRED_SCORING_LIMIT = 64  # deferred entries are scored once this many tokens wait (or before a selection)


@dataclass(frozen=True)
class Protection:
    """Entries no policy may evict: the first ``sinks`` real tokens of a row and the ``recent`` last."""

    sinks: int = 4
    recent: int = 32

    def __post_init__(self) -> None:
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in (self.sinks, self.recent)):
            raise ValueError(f"sinks and recent must be ints >= 0, got sinks={self.sinks!r}, recent={self.recent!r}")

    @property
    def total(self) -> int:
        return self.sinks + self.recent


class EvictingLayer(CacheLayerMixin):
    """One decoder layer's evicting cache.

    Full-attention layers evict with the policy down to the budget; sliding-window layers keep the
    last ``sliding_window - 1`` tokens like transformers' sliding layers and are never policy-evicted.
    """

    def __init__(
        self,
        layer_idx: int,
        depth: int,
        num_layers: int,
        policy: Policy,
        budget: Budget | None,
        protection: Protection,
        slack: int,
        sliding_window: int | None = None,
        config: PretrainedConfig | None = None,
        modality: ModalityMap | None = None,
    ) -> None:
        self.kv: HeadwiseKV | None = None
        super().__init__()
        # depth: index among the model's full-attention layers, num_layers: how many there are
        self.layer_idx, self.depth, self.num_layers = layer_idx, depth, num_layers
        self.policy, self.budget, self.protection, self.slack = policy, budget, protection, slack
        self.sliding_window = sliding_window
        self.config = config
        self.modality = modality or ModalityMap()
        self.record_past = False  # assisted decoding: sliding layers keep their overflow until `crop`
        self.seen = 0
        self.rollback = 0  # while recording the past: the drafts a crop may take back (assisted decoding)
        self.real: torch.Tensor | None = None  # [B] real (non-pad) tokens seen per row
        self.sink_end: torch.Tensor | None = None  # [B] logical position after the row's last sink
        self.real_min = 0  # min(real), kept as an int to avoid device syncs when decoding
        self.evicted = 0  # entries the policy dropped
        self.trimmed = 0  # entries a sliding layer's window let go (as transformers' sliding layers do)
        self.guaranteed_from = 0  # every token from this logical position on is stored (a crop may reach back to it)
        self.since_eviction = 0
        self.paused = False
        self.window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # recent queries
        self.module: torch.nn.Module | None = None
        self.scaling = 1.0
        self.hidden: torch.Tensor | None = None  # attention input of this forward, for needs_hidden scorers
        self.on_forward_end: Callable[[], None] | None = None  # set on the last layer by a global policy
        self.defer_scoring = False  # set by a global policy whose scorer scores late
        self.unscored: list[torch.Tensor] = []  # attention inputs [B, q, D] of the newest, not yet scored entries

    @property
    def is_sliding(self) -> bool:  # read by transformers' mask creation
        return self.sliding_window is not None

    @property
    def keys(self) -> torch.Tensor | None:  # the transformers layer attributes, views of the storage
        return None if self.kv is None else self.kv.keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._refuse_replacing("keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv.values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._refuse_replacing("values", value)

    def _refuse_replacing(self, name: str, value: torch.Tensor | None) -> None:
        """transformers' layer ``__init__`` sets ``keys`` and ``values`` to None; anything else would part them
        from their positions and scores (e.g. transformers' cache offloading, which this cache does not do)."""
        if value is not None or self.kv is not None:
            raise RuntimeError(f"layer {self.layer_idx}: an EvictionCache layer's {name} live in its storage "
                               "and cannot be replaced (cache offloading is not supported)")

    @property
    def is_croppable(self) -> bool:
        """A crop restores the cache exactly only while nothing was evicted and the scorer keeps no sums
        over queries (transformers' assisted decoding checks this once, after its first forward pass, and
        refuses a cache that is not croppable). A sliding layer is, like transformers' own: its window's
        overflow is kept once past recording is on. Evictions during assisted decoding keep the drafts:
        :meth:`recent_span`."""
        if self.sliding_window is not None:
            return True
        return self.evicted == 0 and not self.policy.scorer.accumulates

    # --- transformers layer contract -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv = HeadwiseKV.empty(key_states, value_states, reserve=self.slack)  # room until the next eviction
        b = key_states.shape[0]
        self.real = torch.zeros(b, dtype=torch.long, device=self.device)
        self.sink_end = torch.zeros(b, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``[B, H, q, D]`` new entries and return every entry the queries may see."""
        if self.config is not None and self.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"EvictionCache needs attn_implementation={ATTN_IMPLEMENTATION!r} but the model uses "
                f"{self.config._attn_implementation!r}; build the cache with EvictionCache(model, ...) or call "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_compatible(key_states)
        b, h, q, _ = key_states.shape
        positions = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
        self.kv.append(key_states, value_states, positions)
        self.seen += q
        if self.policy.scorer.needs_hidden and self.sliding_window is None:
            self.hidden = self.take_attention_input()
        hand_over(self)
        return self.kv.keys, self.kv.values

    def take_attention_input(self) -> torch.Tensor:
        """This forward pass's attention input ``[B, q, D]`` of this layer, handed over by the hook."""
        handed = _ATTENTION_INPUT.get()
        _ATTENTION_INPUT.set(None)
        if handed is None or handed[0] != self.layer_idx:
            raise RuntimeError(f"layer {self.layer_idx}: no attention input was handed over; build the cache with "
                               "EvictionCache(model, ...) so the model's attention modules are hooked")
        return handed[1]

    def get_seq_length(self) -> int:
        """Logical tokens seen (not the stored count)."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The logical view: every position ``0 .. seen + q - 1`` (the kvevict mask maps it to entries)."""
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = None
        self.seen, self.evicted, self.trimmed, self.guaranteed_from, self.rollback = 0, 0, 0, 0, 0
        self.paused = self.record_past = False
        self.real = self.sink_end = None
        self.real_min = 0
        self.since_eviction = 0
        self.window = None
        self.unscored = []
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = self.real.shape[0]
            self._select_rows(torch.arange(rows, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (``[B']`` int, or a ``[B]`` bool mask, as transformers' layers take)."""
        if self.is_initialized:
            index = torch.as_tensor(indices)
            self._select_rows(index.nonzero().flatten() if index.dtype == torch.bool else index)

    def activate_past_recording(self, recurrent_states_to_keep: int = 0, **kwargs: Any) -> None:
        """Called by assisted decoding: sliding layers keep what leaves the window until ``crop``, and
        evictions keep the last ``recurrent_states_to_keep`` tokens (transformers >= 5.25 passes the
        number of drafted tokens; 5.24 passes nothing) besides the recent window, so that ``crop`` can
        take back rejected drafts. Other keyword arguments are for recurrent layers and are ignored."""
        self.record_past = True
        self.rollback = int(recurrent_states_to_keep or 0)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (``crop(0)`` trims sliding layers back to their window).

        Only tokens still guaranteed to be stored can be forgotten: within the recent span that the
        latest eviction protected (:meth:`recent_span`); in sliding layers, only while past recording
        is on. What a scorer summed over queries (H2O's attention received) keeps the forgotten
        queries' share. Forgetting every head's latest slots copies nothing (the spare room stays).
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of tokens to remove, got {tokens_to_remove}")
        if not self.is_initialized:
            return
        new_seen = self.seen + tokens_to_remove
        if new_seen < 0:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens from a cache that has seen {self.seen}")
        removed = self.seen - new_seen
        if not removed and self.sliding_window is None:
            return  # nothing to forget: the storage keeps its spare room, deferred scores stay deferred
        self.score_pending()
        if self.sliding_window is not None:
            if removed and not self.record_past and self.seen >= self.sliding_window:
                raise RuntimeError(
                    f"layer {self.layer_idx}: a full sliding window cannot be cropped without past recording; "
                    "call cache.activate_past_recording() before the tokens to roll back"
                )
        elif new_seen < self.guaranteed_from:
            raise ValueError(
                f"layer {self.layer_idx}: cannot crop {removed} tokens: only the tokens from position "
                f"{self.guaranteed_from} on are guaranteed to be stored (the recent tokens the latest eviction "
                f"protected; raise `recent`, now {self.protection.recent}, to allow deeper rollbacks)"
            )
        dropped = self.kv.positions >= new_seen
        self.real = self.real - dropped.sum(-1).amax(-1)  # every head stores the recent tokens
        self.real_min = int(self.real.min())
        if self.sliding_window is None:
            self.kv.forget_from(new_seen)
        else:
            self.kv.compact(~dropped & (self.kv.positions > new_seen - self.sliding_window))
        if self.window is not None:
            q, pos, real = self.window
            kept = pos < new_seen
            self.window = (q[:, :, kept], pos[kept], real[:, kept])
        self.sink_end = self.sink_end.clamp(max=new_seen)
        self.seen = new_seen

    # --- eviction ---------------------------------------------------------------------------------
    def after_attention(self, queries: torch.Tensor, info: KVMask | None, module: torch.nn.Module,
                        scaling: float) -> None:
        """Called by the attention function once the new entries were attended: drop pads, score, evict.

        ``queries`` ``[B, Hq, q, D]`` are this forward pass's queries (after RoPE).
        """
        q = queries.shape[2]
        padding = None if info is None else info.padding
        if padding is not None or self.real_min < self.protection.sinks:
            is_real = self._track_new_tokens(q, padding)
            new_pads = not bool(is_real.all())
        else:
            is_real, new_pads = None, False
            self.real = self.real + q  # not in place: the tensor may come from an inference_mode prefill
            self.real_min += q
        self.module, self.scaling = module, scaling
        self.since_eviction += q
        if self.sliding_window is not None:
            valid = self.kv.valid()
            keep = valid if self.record_past else self.kv.positions > self.seen - self.sliding_window
            if new_pads or bool((valid & ~keep).any()):
                self.trimmed += self.kv.compact(keep)
            return
        scorer = self.policy.scorer
        if is_real is None and (scorer.query_window or scorer.observes):
            is_real = torch.ones(queries.shape[0], q, dtype=torch.bool, device=self.device)
        if scorer.query_window:
            self._remember_queries(queries.detach(), is_real)
        if scorer.observes:
            if self.defer_scoring and q <= DEFERRED_OBSERVE_TOKENS and not new_pads:
                self.unscored.append(self.hidden)  # scored in a batch: EvictionCache.score_pending
            else:
                if self.unscored:  # deferred entries precede this pass's in the storage
                    self.unscored.append(self.hidden)
                    self.hidden = self._pop_unscored()
                q_pos = torch.arange(self.seen - q, self.seen, device=self.device)
                scorer.observe(self.score_inputs(queries.detach(), q_pos, is_real))
            self.hidden = None
        evicted = self.policy.allocator.scope == "layer" and not self.paused and self._evict(force=new_pads)
        if new_pads and not evicted:
            self.kv.compact(self.kv.valid())
        if self.on_forward_end is not None:
            self.on_forward_end()

    def _track_new_tokens(self, q: int, padding: torch.Tensor | None) -> torch.Tensor:
        """Mark the last ``q`` slots' pads empty; update real-token counts and each row's sink span.

        Returns ``[B, q]`` bool: which new tokens are real.
        """
        new = self.kv.positions[..., -q:]  # [B, H, q]
        if padding is None:
            is_real = torch.ones(new.shape[0], q, dtype=torch.bool, device=self.device)
        else:
            is_real = padding.to(self.device)[:, self.seen - q : self.seen]  # [B, q]
            self.kv.clear(~is_real[:, None, :].expand_as(new))
        rank = self.real[:, None] + is_real.long().cumsum(-1) - 1
        sink = is_real & (rank < self.protection.sinks)
        ends = torch.where(sink, new[:, 0, :] + 1, 0).amax(-1)
        self.sink_end = torch.maximum(self.sink_end, ends)
        self.real = self.real + is_real.long().sum(-1)
        self.real_min = int(self.real.min())
        return is_real

    def _remember_queries(self, queries: torch.Tensor, real: torch.Tensor) -> None:
        """Keep the last ``scorer.query_window`` queries ``[B, Hq, w, D]`` with positions and pad flags ``[B, q]``."""
        w, q = self.policy.scorer.query_window, queries.shape[2]
        pos = torch.arange(self.seen - q, self.seen, device=self.device)
        if self.window is not None:
            queries = torch.cat([self.window[0], queries], dim=2)
            pos = torch.cat([self.window[1], pos])
            real = torch.cat([self.window[2], real], dim=1)
        self.window = (queries[:, :, -w:].clone(), pos[-w:], real[:, -w:])  # clone: don't pin the whole chunk

    def _pop_unscored(self) -> torch.Tensor:
        """The waiting attention inputs as one ``[B, n, D]`` tensor, oldest first (the last ``n`` slots)."""
        hidden = torch.cat(self.unscored, dim=1)
        self.unscored = []
        return hidden

    def take_unscored(self) -> ScoreInputs:
        """Score inputs for the entries whose scoring was deferred: the last ``n`` slots, ``hidden`` ``[B, n, D]``."""
        self.hidden = self._pop_unscored()
        inputs = self.score_inputs()
        self.hidden = None
        return inputs

    def score_pending(self) -> None:
        """Score the deferred entries now (before the layout changes)."""
        if self.unscored:
            self.policy.scorer.observe(self.take_unscored())

    def score_inputs(self, queries: torch.Tensor | None = None, query_positions: torch.Tensor | None = None,
                     query_real: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> ScoreInputs:
        """What the scorer sees now; by default the remembered query window."""
        if queries is None and self.window is not None:
            queries, query_positions, query_real = self.window
        return ScoreInputs(
            keys=self.kv.keys, values=self.kv.values, positions=self.kv.positions, layer_idx=self.layer_idx,
            seen=self.seen, scaling=self.scaling, state=self.kv.extra, queries=queries,
            query_positions=query_positions, query_real=query_real, module=self.module,
            image=self.modality.lookup(self.kv.positions), hidden=self.hidden, kept=kept,
        )

    def recent_span(self) -> int:
        """How many of the latest tokens an eviction now keeps: ``recent``, and while past recording is on
        (assisted decoding) at least the drafts a crop may take back."""
        return max(self.protection.recent, self.rollback) if self.record_past else self.protection.recent

    def selection_inputs(self, budget: torch.Tensor) -> SelectionInputs:
        """Score the entries and mark what is protected (first real tokens, recent span)."""
        pos = self.kv.positions
        valid = pos >= 0
        protected = valid & ((pos < self.sink_end[:, None, None]) | (pos >= self.seen - self.recent_span()))
        kept = None
        if self.budget is not None:  # the model-wide share (before a per-layer allocator's factor)
            kept = self.budget.entries(self.real).double() / self.real.clamp(min=1)
        inputs = self.score_inputs(kept=kept)
        scores = self.policy.scorer.score(inputs)
        return SelectionInputs(scores, valid, protected, budget, inputs.image)

    def layer_budget(self) -> torch.Tensor:
        """``[B]`` entries per KV head each row may keep in this layer (never below the protected)."""
        factor = self.policy.allocator.layer_factor(self.depth, self.num_layers)
        budget = torch.ceil(self.budget.entries(self.real).double() * factor).long()
        return budget.clamp(min=self.protection.total + 1)

    def _evict(self, force: bool) -> bool:
        """Evict, in each row over ``budget + slack``, down to the budget. Returns whether it compacted."""
        allocator = self.policy.allocator
        if allocator.needs_budget:
            if self.budget is None:
                return False
            factor = allocator.layer_factor(self.depth, self.num_layers)
            limit = max(math.ceil(self.budget.entries_for(self.real_min) * factor), self.protection.total + 1)
            if not force and not self.kv.has_holes and self.kv.length <= limit + self.slack:
                return False  # fast path: every head of every row is within budget + slack
            budget = self.layer_budget()
            counts = self.kv.counts()  # [B, H]
            if allocator.headwise:  # heads trade entries: only the row's total counts
                over = counts.sum(-1) > counts.shape[1] * (budget + self.slack)
            else:
                over = (counts > (budget + self.slack)[:, None]).any(-1)  # [B]
        else:
            if not force and self.since_eviction < self.slack:
                return False
            budget = self.kv.counts().amax(-1)
            over = torch.ones_like(budget, dtype=torch.bool)
        if not force and not bool(over.any()):
            return False
        self.since_eviction = 0
        inputs = self.selection_inputs(budget)
        self.keep(allocator.select(inputs), inputs, over)
        return True

    def keep(self, selected: torch.Tensor, inputs: SelectionInputs, rows: torch.Tensor) -> None:
        """Compact to the ``selected`` slots plus the protected ones, in the ``rows`` ``[B]`` that are over
        budget; other rows keep everything, as they would if they ran alone."""
        keep = selected | (inputs.protected & inputs.valid)
        dropped = self.kv.compact(torch.where(rows[:, None, None], keep, inputs.valid))
        if dropped:
            self.evicted += dropped
            self.guaranteed_from = max(self.guaranteed_from, self.seen - self.recent_span())

    # --- helpers ----------------------------------------------------------------------------------
    def _check_compatible(self, key_states: torch.Tensor) -> None:
        held = self.kv.buffers["keys"]
        if key_states.dtype != held.dtype or key_states.device != held.device:
            raise ValueError(
                f"layer {self.layer_idx}: new keys are {key_states.dtype} on {key_states.device} but the cache holds "
                f"{held.dtype} on {held.device}"
            )
        if key_states.shape[0] != held.shape[0]:
            raise ValueError(
                f"this cache holds a batch of {held.shape[0]} rows but got {key_states.shape[0]}; "
                "use a new EvictionCache (or cache.reset()) for a different batch"
            )
        if key_states.shape[1] != held.shape[1] or key_states.shape[-1] != held.shape[-1]:
            raise ValueError(
                f"layer {self.layer_idx}: keys of shape {tuple(key_states.shape)} do not match the cache's "
                f"{held.shape[1]} heads x {held.shape[-1]} dims; was the cache built for another model?"
            )

    def _select_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.score_pending()
        self.kv.select_rows(index)
        self.real = self.real.index_select(0, index.to(self.device))
        self.sink_end = self.sink_end.index_select(0, index.to(self.device))
        self.real_min = int(self.real.min())
        if self.window is not None:
            q, pos, real = self.window
            self.window = (q.index_select(0, index.to(q.device)), pos, real.index_select(0, index.to(q.device)))


class EvictionCache(Cache):
    """Drop-in replacement for ``DynamicCache`` that evicts KV entries under a budget.

    Args:
        model: the model (its attention implementation is switched to ``"kvevict"``) or its config
            (then call ``model.set_attn_implementation("kvevict")`` yourself).
        policy: a name (``"streaming"``, ``"uniform:streaming"``), a :class:`~kvevict.scoring.Scorer`
            or a :class:`~kvevict.policy.Policy`.
        budget: entries kept per (layer, KV head) (int, on average), a fraction of the tokens seen
            (float in (0, 1]), or ``None``: no eviction, unless the allocator sets the budget itself
            (``Threshold``, which asks for ``None``).
        sinks, recent: protected first real tokens and most recent tokens of each row.
        slack: eviction runs once a head holds more than ``budget + slack`` entries.
    """

    def __init__(
        self,
        model: PreTrainedModel | PretrainedConfig,
        policy: str | Policy = "streaming",
        budget: int | float | None = 512,
        *,
        sinks: int = 4,
        recent: int = 32,
        slack: int = 32,
    ) -> None:
        register()
        config = model if isinstance(model, PretrainedConfig) else model.config
        text = config.get_text_config(decoder=True)
        _check_architecture(text)
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be an int >= 0, got {slack!r}")
        self.policy = resolve_policy(policy, config)
        if not self.policy.allocator.needs_budget and budget is not None:
            raise ValueError(f"{self.policy.allocator!r} sets the budget itself: pass budget=None")
        protection = Protection(sinks, recent)
        self.budget = None if budget is None else Budget(budget, floor=protection.total)
        self.slack = slack
        layer_types = _layer_types(text)
        needs_hidden = self.policy.scorer.needs_hidden
        if needs_hidden and not isinstance(model, PreTrainedModel):
            raise ValueError(f"{self.policy.scorer.name!r} reads hidden states: build the cache from the model")
        to_hook = _attention_modules_of(model) if needs_hidden else []
        if isinstance(model, PreTrainedModel):  # only once the arguments are known to be good
            _switch_attention(model)
        _hook_attention_inputs(to_hook)
        windows = [text.sliding_window if t == "sliding_attention" else None for t in layer_types]
        depths = (torch.tensor([w is None for w in windows]).cumsum(0) - 1).tolist()
        self.config, self.modality = config, ModalityMap()
        layers = [
            EvictingLayer(i, depth, windows.count(None), self.policy, self.budget, protection, slack, w, text,
                          self.modality)
            for i, (depth, w) in enumerate(zip(depths, windows))
        ]
        super().__init__(layers=layers)
        self.full = [layer for layer in layers if layer.sliding_window is None]
        if self.policy.allocator.scope == "global" and self.budget is not None and self.full:
            self.full[-1].on_forward_end = self._end_of_forward
            for layer in self.full:
                layer.defer_scoring = self.policy.scorer.scores_late

    def _end_of_forward(self) -> None:
        """After the last full-attention layer: the global eviction (unless paused); deferred scoring
        once enough entries wait."""
        if sum(h.shape[1] for h in self.full[-1].unscored) >= DEFERRED_SCORING_LIMIT:
            self.score_pending()
        if not self.full[-1].paused:
            self._evict_globally()

    def score_pending(self) -> None:
        """Score the entries whose scoring was deferred, all layers in one batch. A scorer that scores
        late (the learned policy) gets new decoding entries in batches, and always before a selection;
        call this only to inspect the scores."""
        layers = [layer for layer in self.full if layer.unscored]
        if layers:
            self.policy.scorer.observe_layers([layer.take_unscored() for layer in layers])

    def _evict_globally(self) -> None:
        """Global top-k over all full-attention layers, once per forward pass."""
        full = self.full
        if full[-1].since_eviction < self.slack:
            return  # every row was within the budget after the last eviction, and fewer than `slack` tokens came since
        heads = full[0].kv.keys.shape[1]
        limit = len(full) * heads * (self.budget.entries_for(full[0].real_min) + self.slack)
        if not any(layer.kv.has_holes for layer in full) and sum(l.kv.length for l in full) * heads <= limit:
            return  # fast path: within budget + slack everywhere
        budget = self.budget.entries(full[0].real)  # [B]
        held = sum(layer.kv.counts().sum(-1) for layer in full)  # [B]
        over = held > len(full) * heads * (budget + self.slack)
        if not bool(over.any()):
            return
        self.score_pending()
        inputs = [layer.selection_inputs(budget) for layer in full]
        keeps = self.policy.allocator.select_all(inputs, len(full) * heads * budget)
        for layer, x, keep in zip(full, inputs, keeps):
            layer.keep(keep, x, over)
        if bool(over.all()):
            for layer in full:
                layer.since_eviction = 0

    def prepare(self, inputs: dict | torch.Tensor) -> "EvictionCache":
        """Tell the cache which positions hold image tokens, from the model inputs (a processor's
        output or ``input_ids`` ``[B, n]`` of the whole conversation so far). Call before ``generate``
        with the inputs given to it: a map of ``B`` rows is repeated for ``generate``'s expanded batch
        (beams, ``num_return_sequences``), so other inputs with fewer rows would silently lend theirs."""
        ids = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
        self.modality.set(ids == image_token_id(self.config))
        return self

    def _rows(self) -> int | None:
        """Rows (sequences) the cache holds; ``None`` before its first forward pass."""
        used = [layer for layer in self.layers if layer.is_initialized]
        return used[0].real.shape[0] if used else None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.modality.select_rows(beam_idx, len(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self._rows()
        super().batch_repeat_interleave(repeats)
        if self.modality.image is not None:
            rows = rows or self.modality.image.shape[0]
            self.modality.select_rows(torch.arange(rows).repeat_interleave(repeats), rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows = self._rows()
        super().batch_select_indices(indices)
        if self.modality.image is not None:
            self.modality.select_rows(torch.as_tensor(indices), rows or self.modality.image.shape[0])

    def reset(self) -> None:
        """Empty the cache for another conversation; it forgets the image positions too."""
        super().reset()
        self.modality.image = None

    def pause_eviction(self, paused: bool = True) -> None:
        """Stop (or resume) policy eviction, e.g. to append a question to a compressed context that the
        policy compressed without seeing it (sliding-window layers keep sliding). Scorers still observe
        while paused, since new entries must be scored: resuming after a question is not query-agnostic."""
        for layer in self.layers:
            layer.paused = paused

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"this cache was built for {len(self.layers)} layers but got layer {layer_idx}; "
                "was it built for another model?"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stats(self) -> dict:
        """Tokens seen, entries kept per layer and KV head, bytes held, entries evicted so far and entries the
        sliding layers' windows let go (``trimmed``)."""
        used = [layer for layer in self.layers if layer.is_initialized]
        return {
            "policy": str(self.policy),
            "budget": None if self.budget is None else self.budget.value,
            "tokens_seen": used[0].real.tolist() if used else [],
            "logical_length": self.get_seq_length(),
            "entries": [layer.kv.counts().tolist() for layer in used],
            "entries_total": sum(int(layer.kv.counts().sum()) for layer in used),
            "bytes": sum(layer.kv.nbytes() for layer in used),
            "evicted": sum(layer.evicted for layer in used),
            "trimmed": sum(layer.trimmed for layer in used),
        }


_ATTENTION_INPUT: ContextVar[tuple[int, torch.Tensor] | None] = ContextVar("kvevict_attention_input", default=None)


def _attention_modules_of(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's attention modules (those with a layer index); an error if it has none."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules with a layer index in {type(model).__name__}")
    return modules


def _hook_attention_inputs(modules: list[torch.nn.Module]) -> None:
    """Make each attention module hand its input (the normalised hidden states) to the cache layer
    whose ``update`` it calls next (see :meth:`EvictingLayer.take_attention_input`). Installed once
    per model; caches come and go without touching the hooks."""
    for module in modules:
        if not getattr(module, "_kvevict_input_hook", False):
            module.register_forward_pre_hook(_hand_over_input, with_kwargs=True)
            module._kvevict_input_hook = True


def _hand_over_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    _ATTENTION_INPUT.set((module.layer_idx, attention_input(args, kwargs).detach()))


def _switch_attention(model: PreTrainedModel) -> None:
    """Point the model's language-model attention at the kvevict implementation."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not use transformers' AttentionInterface, so kvevict cannot attend over "
            "evicted caches for it"
        )
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def _layer_types(text: PretrainedConfig) -> list[str]:
    n = text.num_hidden_layers
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * n)
    unsupported = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise ValueError(f"kvevict supports {SUPPORTED_LAYER_TYPES} layers; this model also has {unsupported}")
    return types


def _check_architecture(text: PretrainedConfig) -> None:
    """Reject models without standard multi-head attention layers."""
    missing = [a for a in ("num_hidden_layers", "num_attention_heads") if getattr(text, a, None) is None]
    if missing:
        raise ValueError(f"{type(text).__name__} lacks {missing}: not a model with standard attention layers")
