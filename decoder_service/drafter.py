"""The MTP drafter (``--draft-model``): loaded, checked against the target, and how many tokens
each sequence drafts next.

Why: a Gemma 4 assistant drafter reads the target's own K/V and hidden state, so a drafter for
another target does not fail loudly — it drafts garbage, or crashes mid-request on a shape.  Every
field the two must share is checked at start, with the field named (``check_compatible``).  How
deep to draft is per sequence (``DraftPolicy``): from its recent acceptance, off while a sequence's
drafts keep being rejected (a round that drafts and rejects costs more than a plain step), probed
again now and then.

MLX thread only (``Drafter``); ``check_compatible`` and ``DraftPolicy`` are pure.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from decoder_service import mtp_adapter


def _get(cfg, name: str, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def check_compatible(target_text: object, drafter_config: object) -> None:
    """Raise ``ValueError`` naming every field where the drafter cannot pair with this target."""
    model_type = _get(drafter_config, "model_type")
    if model_type not in mtp_adapter.DRAFTER_TYPES:
        raise ValueError(f"--draft-model: model_type {model_type!r} is not a Gemma 4 MTP assistant "
                         f"({', '.join(mtp_adapter.DRAFTER_TYPES)})")
    text = _get(drafter_config, "text_config")
    problems = []

    def same(what: str, mine, theirs) -> None:
        if mine != theirs:
            problems.append(f"{what}: drafter {mine!r}, target {theirs!r}")

    same("backbone_hidden_size (target hidden_size)", _get(drafter_config, "backbone_hidden_size"),
         _get(target_text, "hidden_size"))
    for name in ("vocab_size", "head_dim", "sliding_window", "rope_parameters"):
        same(name, _get(text, name), _get(target_text, name))
    types = set(_get(text, "layer_types") or [])
    if "full_attention" in types:
        same("global_head_dim", _get(text, "global_head_dim") or _get(text, "head_dim"),
             _get(target_text, "global_head_dim") or _get(target_text, "head_dim"))
    missing = types - set(_get(target_text, "layer_types") or [])
    if missing:
        problems.append(f"layer_types: the drafter reads {sorted(missing)}, which the target does not have")
    heads = int(_get(text, "num_attention_heads") or 0)
    kv = {"sliding_attention": int(_get(target_text, "num_key_value_heads") or 1)}
    full_kv = _get(target_text, "num_global_key_value_heads") if _get(target_text, "attention_k_eq_v") else None
    kv["full_attention"] = int(full_kv or kv["sliding_attention"])
    for t in sorted(types & set(kv)):
        if heads % kv[t]:
            problems.append(f"num_attention_heads: the drafter's {heads} query heads do not group over the "
                            f"target's {kv[t]} {t} KV heads")
    if problems:
        raise ValueError("--draft-model does not fit this checkpoint: " + "; ".join(problems))


class Drafter:
    """A loaded assistant drafter bound to the decoder's LM (MLX thread)."""

    def __init__(self, path: Path, lm, *, block_size: int | None = None) -> None:
        try:
            declared = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--draft-model {path}: cannot read its config.json ({e})") from None
        check_compatible(lm.config, declared)  # before its weights are read: name the field, not a shape
        model, config = mtp_adapter.load(path)
        mtp_adapter.bind(model, lm)
        self.model, self.lm = model, lm
        self.block_size = int(block_size or getattr(config, "block_size", 4) or 4)
        if self.block_size < 2:
            raise ValueError("--draft-block-size must be at least 2 (one token verified, one drafted)")
        self.path = Path(path)

    def draft(self, st, k: int):
        """``k`` greedy drafts after the stream's next input (``speculative.SpecStream``: its
        ``bonus``, ``hidden``, ``shared_kv`` and ``fed``): a lazy ``[1, k]`` array (the caller's
        stream), evaluated with the verify forward that reads it."""
        return mtp_adapter.draft(self.model, st.bonus, st.hidden, st.shared_kv, len(st.fed), k)


@dataclass
class DraftPolicy:
    """How many tokens one sequence drafts next round (pure).

    ``max_drafts`` = block size - 1.  Depth follows the mean accepted count of the last rounds
    (one more than it, so a run of full acceptance grows back to the maximum).  When the mean of
    ``window`` / 2 or more rounds falls below ``off_below`` the sequence decodes plainly for
    ``pause`` steps, then probes with one draft a round: a probe accepted resumes drafting, two
    rejected pause it again for twice as long (up to ``max_pause``) — a drafter that does not fit
    the traffic costs a probe every few hundred steps, not a slower stream."""

    max_drafts: int
    window: int = 8
    off_below: float = 0.25
    pause: int = 16
    max_pause: int = 512
    recent: deque = field(default_factory=deque)
    paused: int = 0
    probing: bool = False
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    by_position: list = field(default_factory=list)  # accepted count per draft position (1-based)

    def __post_init__(self) -> None:
        self.recent = deque(self.recent, maxlen=self.window)
        self._pause = self.pause

    def next_k(self, remaining: int) -> int:
        """Drafts for the next round, given ``remaining`` tokens the sequence may still emit."""
        if self.paused > 0:
            self.paused -= 1
            return 0
        k = self.max_drafts
        if self.probing:
            k = 1
        elif len(self.recent) >= 4:
            k = min(k, int(sum(self.recent) / len(self.recent)) + 1)
        return max(0, min(k, remaining - 1))

    def record(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.by_position) < drafted:
            self.by_position.append(0)
        for i in range(accepted):
            self.by_position[i] += 1
        self.recent.append(accepted)
        if self.probing:
            if accepted:
                self.probing, self._pause = False, self.pause
                self.recent.clear()
            elif len(self.recent) >= 2:
                self._stop()
            return
        if len(self.recent) >= self.window // 2 and sum(self.recent) / len(self.recent) < self.off_below:
            self._stop()

    def _stop(self) -> None:
        self.paused, self.probing = self._pause, True
        self._pause = min(2 * self._pause, self.max_pause)
        self.recent.clear()


@dataclass
class DraftGate:
    """Whether the running batch takes a drafting round or a plain step (pure: the scheduler feeds it
    the times it measures).

    A round is worth it when its tokens per row arrive faster than plain steps would bring them:
    ``round time < tokens per row a round × plain step time`` at that batch size.  Both sides are
    measured, per batch size (exponential averages), so the gate is right for the machine and the
    model at hand: on a large model decode is bound by reading the weights and a verify block costs
    about one step; on a tiny one every step is Python and kernel launches, and a round's drafting
    and bookkeeping cost several.  A batch size whose rounds lose is re-tried after ``explore``
    steps, the wait doubling while it keeps losing (up to ``max_explore``)."""

    alpha: float = 0.2
    explore: int = 32
    max_explore: int = 1024
    plain: dict = field(default_factory=dict)  # batch size -> seconds a plain step
    round_s: dict = field(default_factory=dict)  # batch size -> seconds a round
    gain: dict = field(default_factory=dict)  # batch size -> tokens a row per round
    _wait: dict = field(default_factory=dict)  # batch size -> plain steps until the next try
    _every: dict = field(default_factory=dict)

    def want(self, rows: int) -> bool:
        if rows not in self.plain:
            return False  # time a plain step first
        if rows not in self.round_s or self.round_s[rows] < self.gain[rows] * self.plain[rows]:
            return True
        left = self._wait.get(rows, self._every.get(rows, self.explore))
        if left <= 0:
            self._wait[rows] = self._every[rows] = min(2 * self._every.get(rows, self.explore), self.max_explore)
            return True
        self._wait[rows] = left - 1
        return False

    def stepped(self, rows: int, seconds: float) -> None:
        self.plain[rows] = self._ema(self.plain.get(rows), seconds)

    def drafted(self, rows: int, seconds: float, tokens_per_row: float) -> None:
        self.round_s[rows] = self._ema(self.round_s.get(rows), seconds)
        self.gain[rows] = self._ema(self.gain.get(rows), tokens_per_row)
        if self.round_s[rows] < self.gain[rows] * self.plain.get(rows, float("inf")):
            self._every.pop(rows, None)  # winning: no back-off
            self._wait.pop(rows, None)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new
