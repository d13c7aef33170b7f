"""Weighted data mixtures (`data.mix`): which source each training window comes from.

Each source is a corpus of its own (tokenized and cached on its own, as data.source
is) cut into windows of seq_len + 1 tokens. The training stream is a sequence of
slots j = 0, 1, 2, ... (step s takes slots s*G .. s*G + G - 1, as the single-source
stream takes windows of its permutation). Slots are dealt out in chunks of
MIX_CHUNK: through the first m chunks, source i has had exactly

    D_i(m) = floor(m * MIX_CHUNK * w_i)          (w: the weights, summing to 1)

slots, so chunk m holds D_i(m + 1) - D_i(m) slots of source i, in an order shuffled by
(seed, m). A source's shares are exact to one slot per chunk, and where slot j stands
(its chunk, its source, the how-many-th draw d of that source it is) is arithmetic,
with no pass over the slots before it: a resumed run continues exactly, at any step.
Draw d of source i is window perm_i(d // n_i)[d % n_i] (n_i: the source's windows;
a permutation seeded by (seed, epoch of that source, i)), so a source goes through all
its windows before repeating one, and a small source with a large weight repeats
sooner than a large one.

    chunk m:   | a b a c a b a a b c ... |  (counts fixed by the weights, order shuffled)
    source a:    perm_a: 5 0 3 ...          draws D_a(m), D_a(m)+1, ...

With train.stages, each stage draws by its own weights (train.stages[k].mix, or
data.mix's): stage k is a mixture of its own over the same sources and token caches, in
windows of its seq_len, its slots counted from the stage's start and its chunk orders
and permutations seeded by (seed, k) (stage 0 by seed alone, as a run without stages),
so a stage starts a fresh pass over each source. A source a stage leaves out has weight
0 there: no slot of that stage.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from glob import has_magic
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from arch.registry import nearest
from lit_modules.data.corpus import DataError

MIX_CHUNK = 4096  # slots per chunk: each source's count is exact at every chunk boundary
MIX_SALT = 0x6D6978  # keeps the chunk orders' random streams apart from the window permutations'
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class MixEntry:
    name: str
    weight: float  # normalised: the weights of a mix sum to 1
    source: Any
    text_field: Optional[str] = None  # null: data.text_field


def _default_name(source: Any) -> Optional[str]:
    """A short name from a source: 'stdlib', a file's stem, a glob's last plain folder."""
    if not isinstance(source, str):
        return None
    if source in ("stdlib", "site-packages"):
        return source
    parts = [p for p in Path(os.path.expanduser(source)).parts if p not in ("/", ".", "..")]
    while parts and has_magic(parts[-1]):
        parts.pop()
    if not parts:
        return None
    name = parts[-1]
    while "." in name.strip(".") and name.rsplit(".", 1)[1] in ("gz", "txt", "md", "jsonl", "parquet", "arrow"):
        name = name.rsplit(".", 1)[0]
    return name


def mix_entries(cfg) -> Optional[List[MixEntry]]:
    """data.mix checked and normalised, or None without a mix; one DataError naming the
    entry for an empty mix, an entry without a source, a bad or repeated name."""
    mix = cfg.mix
    if mix is None:
        return None
    if len(mix) == 0:
        raise DataError("data.mix is an empty list; give at least one {source, weight, name} entry, or set "
                        "data.mix=null to train on data.source.")
    total = float(sum(e.weight for e in mix))
    out, seen = [], set()
    for i, e in enumerate(mix):
        if e.source is None or (not isinstance(e.source, str) and len(e.source) == 0) or e.source == "":
            raise DataError(f"data.mix[{i}] has no source; set data.mix[{i}].source to what data.source accepts "
                            f"('stdlib', a path or glob, or a list of them).")
        name = e.name if e.name is not None else _default_name(e.source)
        if name is None or not _NAME.match(name):
            raise DataError(f"data.mix[{i}].name = {name!r} is not a usable name (letters, digits, '_', '.', "
                            f"'-'); set data.mix[{i}].name, which names the source in val/<name>/loss.")
        if name in seen:
            raise DataError(f"data.mix names '{name}' twice (data.mix[{i}]); give each entry a distinct "
                            f"data.mix[*].name.")
        seen.add(name)
        out.append(MixEntry(name, float(e.weight) / total, e.source, e.text_field))
    if len(out) > MIX_CHUNK:
        raise DataError(f"data.mix has {len(out):,} sources, more than the {MIX_CHUNK:,} windows of a mixing chunk; "
                        f"merge small sources into one entry (its source may be a list).")
    return out


def stage_weights(entries: Sequence[MixEntry], plan: Sequence[Any]) -> List[np.ndarray]:
    """Per stage of `plan` (arch.stages.stage_plan), its weights over data.mix's sources in
    data.mix's order, summing to 1 (0: not drawn in that stage); one DataError for a
    stage mix naming a source data.mix does not have."""
    names = [e.name for e in entries]
    out = []
    for st in plan:
        if not st.mix:
            out.append(np.array([e.weight for e in entries], dtype=np.float64))
            continue
        given = dict(st.mix)
        for n in given:
            if n not in names:
                raise DataError(f"train.stages[{st.index}].mix names '{n}', which is not a source of data.mix"
                                f"{nearest(n, names)}; its sources are {', '.join(names)}.")
        w = np.array([given.get(n, 0.0) for n in names], dtype=np.float64)
        out.append(w / w.sum())
    return out


class MixSchedule:
    """Slot j -> (source, draw of that source), as the module docstring lays out."""

    def __init__(self, weights: Sequence[float], seed: int, chunk: int = MIX_CHUNK, salt: tuple = ()):
        w = np.asarray(weights, dtype=np.float64)
        self.w, self.seed, self.chunk = w / w.sum(), int(seed), int(chunk)
        self.salt = tuple(salt)  # more seed words: a later stage's own chunk orders
        self._cache: dict = {}

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}

    def drawn(self, m: int) -> np.ndarray:
        """Slots of each source in the first m chunks."""
        return np.floor(m * self.chunk * self.w).astype(np.int64)

    def chunk_start(self, m: int) -> int:
        return int(self.drawn(m).sum())

    def _chunk(self, m: int) -> Tuple[np.ndarray, np.ndarray]:
        """(source, draw) of every slot of chunk m."""
        hit = self._cache.get(m)
        if hit is not None:
            return hit
        before = self.drawn(m)
        counts = self.drawn(m + 1) - before
        rng = np.random.default_rng([self.seed, *self.salt, MIX_SALT, m])
        src = rng.permutation(np.repeat(np.arange(len(self.w)), counts))
        # the how-many-th slot of its source within the chunk
        rank = np.empty(len(src), dtype=np.int64)
        for i in range(len(self.w)):
            where = np.flatnonzero(src == i)
            rank[where] = np.arange(len(where))
        draws = before[src] + rank
        if len(self._cache) >= 4:  # a batch spans at most a few chunks
            self._cache.clear()
        self._cache[m] = (src, draws)
        return src, draws

    def locate(self, slots: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(source, draw) of each slot."""
        slots = np.asarray(slots, dtype=np.int64)
        # chunk_start(m) lies in (m*chunk - sources, m*chunk] (sources <= chunk, checked
        # in mix_entries), so slot j is in chunk j // chunk or the next one
        m = slots // self.chunk
        starts = {int(c): self.chunk_start(int(c)) for c in np.unique(np.concatenate([m, m + 1]))}
        m = m + (slots >= np.array([starts[int(c) + 1] for c in m], dtype=np.int64))
        src = np.empty(len(slots), dtype=np.int64)
        draws = np.empty(len(slots), dtype=np.int64)
        for c in np.unique(m).tolist():
            at = np.flatnonzero(m == c)
            s, d = self._chunk(c)
            offset = slots[at] - (starts[c] if c in starts else self.chunk_start(c))
            src[at], draws[at] = s[offset], d[offset]
        return src, draws


class MixWindows:
    """Training windows of several sources, addressed by slot (see MixSchedule). Holds
    each source's windows object (n, window, array()); memmaps open lazily in the
    process that reads them."""

    def __init__(self, parts: Sequence[Any], weights: Sequence[float], seed: int, salt: tuple = ()):
        self.parts, self.seed, self.salt = list(parts), int(seed), tuple(salt)
        self.schedule = MixSchedule(weights, seed, salt=self.salt)
        self.n = sum(p.n for p in self.parts)  # the windows of one "epoch" of the mix
        self.window = self.parts[0].window
        self._perm: dict = {}

    def __getstate__(self):
        return {**self.__dict__, "_perm": {}}

    def _order(self, i: int, epoch: int) -> np.ndarray:
        key = (i, epoch)
        if key not in self._perm:
            if len(self._perm) >= 2 * len(self.parts):
                self._perm.clear()
            self._perm[key] = np.random.default_rng([self.seed, epoch, i + 1, *self.salt]).permutation(self.parts[i].n)
        return self._perm[key]

    def windows(self, slots: np.ndarray) -> List[Tuple[int, int]]:
        """(source, window index in that source) of each slot."""
        src, draws = self.schedule.locate(slots)
        out = []
        for i, d in zip(src.tolist(), draws.tolist()):
            n = self.parts[i].n
            out.append((i, int(self._order(i, d // n)[d % n])))
        return out

    def batch(self, slots: np.ndarray) -> torch.Tensor:
        w = self.window
        rows = [self.parts[i].array()[k * w:(k + 1) * w] for i, k in self.windows(slots)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))
