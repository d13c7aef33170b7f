"""The training data: corpus -> tokenizer -> cached token memmaps -> packed batches.

    dm = TokenDataModule(recipe)     # recipe: a resolved arch.config.Recipe
    dm.prepare_data()                # check inputs, train/load the tokenizer, tokenize (cached)
    dm.setup("fit")
    for batch in dm.train_dataloader():   # LongTensor (micro_batch_size * grad_accum, seq_len + 1)
        ...

Cache (data.cache_dir, default .cache/moelab under the working directory):

    bpe-<key>.json          the trained BPE; key: corpus fingerprint + vocab size
    tokens-<key>/           key: corpus fingerprint + the tokenizer's own hash
        train.bin val.bin   the token streams (uint16, or uint32 past 65,536 tokens)
        meta.json           written last: a folder without it is unfinished and rebuilt

Every file is written under a temporary name and renamed into place, so a killed
process never leaves a cache that looks complete; a lock file (.<entry>.lock) makes
processes that prepare the same entry at once wait for the first instead of
repeating its work. Deleting the cache folder is always safe.

Batches. Documents are packed into one stream, each followed by the tokenizer's
end-of-text token; the training stream is cut into non-overlapping windows of
seq_len + 1 tokens. Each epoch is a permutation of the windows seeded by
(train.seed, epoch); optimizer step s takes windows perm[s*G : (s+1)*G] with
G = micro_batch_size * grad_accum * world_size, and rank r takes every world_size-th
of them starting at r:

    perm:  | step 0: w w w w w w w w | step 1: w w w w w w w w | ...    (G = 8)
    rank 0:         0   2   4   6            0   2   4   6
    rank 1:           1   3   5   7            1   3   5   7

so a step's global batch does not depend on how it is split over ranks. The data
position is a count of consumed batches: under a Trainer it is the trainer's
global_step (one optimizer step per batch), otherwise the batches the loader has
handed out. state_dict() saves it; a resumed run starts the epoch's loader at the
next batch, whatever restarted the loader.

Mixtures (data.mix). Each source is prepared as above by a data module of its own
(its corpus, its tokens-<key>/ cache), all with one tokenizer: data.tokenizer, or a
BPE trained on a sample of the sources' training splits in the proportions of their
weights. Training batches take slots instead of windows of one permutation: slot j of
the run is a window of the source and position that lit_modules/data/mix.py computes
from (seed, j) alone, so the position (and resume) works as above. An "epoch" of a
mix is as many windows as all sources hold together. Validation is one fixed set of
batches per source, a loader each, in data.mix's order.

Streaming (data.streaming): the loaders are litdata's, over token chunks written
beforehand (lit_modules/data/streaming.py); nothing is read or tokenized here, and
the position is litdata's loader state.

With train.stages, each stage has its own windows and batch size, and the batch of a
step is a function of the step (lit_modules/data/staged.py); the position saved is
the step. With data.mix too, each stage is a mixture of its own weights
(train.stages[k].mix, else data.mix's) over the same sources, whose token caches are
built once for the run; every source is validated in every stage, in its windows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from arch.config import Recipe
from arch.stages import stage_after, stage_plan
from lit_modules.data.corpus import Corpus, DataError, SplitPlan, chunks
from lit_modules.data.mix import MixEntry, MixWindows, mix_entries, stage_weights
from lit_modules.data.staged import StagedBatches, StagedValBatches
from lit_modules.disk import check_folder, writing
from lit_modules.data.tokenizer import (
    BPE_MAX_CHARS, BPE_VERSION, Tokenizer, check_vocab, default_log, encode_pieces, eos_id,
    init_encode_worker, load_tokenizer_file, save_atomic, tokenizer_file, tokenizer_sha,
    train_bpe,
    vocab_size,
)

__all__ = ["DataError", "TokenDataModule", "load_or_train_tokenizer"]

CACHE_VERSION = 1  # bump when the token files for the same corpus and tokenizer change
CHUNK_CHARS = 1 << 20  # a longer document is encoded in pieces of about this size
ENCODE_BATCH_CHARS = 1 << 22  # characters handed to encode_batch (parallel) at once
STALE_TMP_SECONDS = 600  # a dead process's temporary file untouched this long is removed
SCAN_TOKENS = 1 << 24  # a cached token file is checked in pieces of this many ids
CACHE_FIX = "free space there, or set data.cache_dir to a writable folder with room"


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_stale_tmp(folder: Path) -> None:
    """Temporary files of processes that died mid-write (pid gone, file idle)."""
    for p in folder.glob("*.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
            continue  # its writer may still be running
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError):
            continue
        try:
            if time.time() - p.stat().st_mtime > STALE_TMP_SECONDS:
                p.unlink()
        except OSError:
            pass


def _read_or_build(entry: Path, read, build):
    """(value, cached): `read()` if the cache entry is complete, else `build()` under
    the entry's lock, unless another process finished it while this one waited."""
    value = read()
    if value is not None:
        return value, True
    with _file_lock(entry.with_name(f".{entry.name}.lock")):
        return read() or build(), False


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise builders of one cache entry (ranks launched together, two runs):
    the second waits, then finds the entry complete. No-op where flock is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Encoder:
    """Encodes batches of pieces here (num_proc 1) or in a pool of worker processes,
    handing the results to `write` in submission order. At most 2 x num_proc batches
    are in flight, so a large corpus is never held in memory whole."""

    def __init__(self, tok: Tokenizer, eos: int, dtype: str, num_proc: int):
        self.tok, self.eos, self.dtype, self.num_proc = tok, eos, dtype, int(num_proc)
        self.pool, self.inflight = None, []

    def __enter__(self):
        if self.num_proc > 1:
            import multiprocessing as mp

            # fork where there is one (no re-import of torch per worker); the workers'
            # tokenizers run single-threaded (the variable also silences tokenizers'
            # warning about forking after its thread pool started)
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self.pool = mp.get_context(method).Pool(self.num_proc, initializer=init_encode_worker,
                                                         initargs=(self.tok.to_str(),))
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
        return self

    def submit(self, pieces: List[str], ends: List[bool], size: int, write) -> None:
        if self.pool is None:
            write(encode_pieces(pieces, ends, self.eos, self.dtype, self.tok), size)
            return
        self.inflight.append((self.pool.apply_async(encode_pieces, (pieces, ends, self.eos, self.dtype)), size))
        while len(self.inflight) > 2 * self.num_proc:
            result, n = self.inflight.pop(0)
            write(result.get(), n)

    def drain(self, write) -> None:
        while self.inflight:
            result, n = self.inflight.pop(0)
            write(result.get(), n)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()  # after drain() all work is done; on an error, stop at once
            self.pool.join()
        return False


# ----------------------------------------------------------------------- batches


class _Windows:
    """Non-overlapping windows of `window` tokens over one token file. The memmap is
    opened lazily in whichever process reads it (a pickled memmap would be copied)."""

    def __init__(self, path: Path, dtype: str, n_tokens: int, window: int):
        self.path, self.dtype, self.n_tokens, self.window = path, dtype, n_tokens, window
        self.n = n_tokens // window
        self._arr = None

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}

    def array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._arr

    def batch(self, ids: np.ndarray) -> torch.Tensor:
        a, w = self.array(), self.window
        rows = np.stack([a[i * w:(i + 1) * w] for i in ids.tolist()])
        return torch.from_numpy(rows.astype(np.int64))


def _worker_share() -> Tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _TrainBatches(IterableDataset):
    """One epoch of this rank's training batches, from batch `start` on. Epoch and
    start are set by the loader (in the main process) before each iteration; with
    DataLoader workers, worker k makes batches start+k, start+k+n, ... and the
    loader's round-robin puts them back in order."""

    def __init__(self, windows: _Windows, batch_size: int, rank: int, world: int, seed: int, salt: tuple = ()):
        self.windows, self.batch_size, self.rank, self.world, self.seed = windows, batch_size, rank, world, seed
        self.salt = tuple(salt)  # more seed words: a later training stage's own order
        self.step_windows = batch_size * world  # windows per optimizer step, all ranks
        # the tail that would leave a rank short is dropped, so ranks step together
        self.batches_per_epoch = windows.n // self.step_windows
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, *self.salt]).permutation(self.windows.n)

    def batch_ids(self, perm: np.ndarray, b: int) -> np.ndarray:
        g = self.step_windows
        return perm[b * g:(b + 1) * g][self.rank::self.world]

    def __iter__(self) -> Iterator[torch.Tensor]:
        perm = self.order(self.epoch)
        k, n = _worker_share()
        for b in range(self.start + k, self.batches_per_epoch, n):
            yield self.windows.batch(self.batch_ids(perm, b))


class _MixTrainBatches(_TrainBatches):
    """Training batches of a mixture: step windows are slots of the run (counted over
    epochs), which MixWindows maps to a source's window."""

    def order(self, epoch: int) -> int:
        return epoch  # slots need no permutation: the schedule shuffles

    def batch_ids(self, epoch: int, b: int) -> np.ndarray:
        g = self.step_windows
        first = (epoch * self.batches_per_epoch + b) * g
        return np.arange(first, first + g, dtype=np.int64)[self.rank::self.world]


class _ValBatches(IterableDataset):
    """A fixed set of validation batches: up to val_batches * micro_batch_size windows
    spread evenly over the validation stream, the same every time. Under DDP each
    rank takes every world-th batch (all ranks the same count, so collectives in
    validation stay matched); fewer batches than ranks are evaluated by every rank."""

    def __init__(self, windows: _Windows, batch_size: int, max_batches: int, rank: int, world: int):
        self.windows = windows
        n, want = windows.n, max(1, max_batches) * batch_size
        if n >= want:
            ids = (np.arange(want, dtype=np.int64) * n) // want
        else:  # whole batches where possible; fewer windows than one batch: one short batch
            ids = np.arange(n - n % batch_size if n >= batch_size else n, dtype=np.int64)
        batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        if len(batches) >= world:
            batches = batches[:len(batches) - len(batches) % world][rank::world]
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        k, n = _worker_share()
        for ids in self.batches[k::n]:
            yield self.windows.batch(ids)


class _TrainLoader(DataLoader):
    """Asks the data module where the data stands each time it is iterated, and
    counts the batches it hands out (the position outside a Trainer)."""

    def __init__(self, dataset: _TrainBatches, dm: "TokenDataModule", **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._dm = dm

    def __iter__(self):
        if isinstance(self.dataset, StagedBatches):
            self.dataset.start_step = self._dm._next_step()
        else:
            epoch, start = self._dm._position()
            self.dataset.epoch, self.dataset.start = epoch, start
        return self._count(super().__iter__())

    def _count(self, it):
        for batch in it:
            self._dm._handed_out += 1
            yield batch


# ----------------------------------------------------------------- data module


class TokenDataModule(pl.LightningDataModule):
    """Tokenizer + packed token memmaps for a recipe; deterministic and resumable.

    rank / world_size default to the trainer's, else torch.distributed's, else 0 / 1.
    verbose prints one line per stage of preparation (rank 0 only); progress shows
    bars for long work (default: when stderr is a terminal).
    """

    def __init__(self, recipe: Recipe, *, verbose: bool = True, progress: Optional[bool] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.recipe = recipe
        self.cfg = recipe.data
        cache = Path(os.path.expanduser(self.cfg.cache_dir))
        self.cache_dir = cache if cache.is_absolute() else Path.cwd() / cache
        self._verbose, self._progress = verbose, progress
        self._rank, self._world = rank, world_size
        self._corpus: Optional[Corpus] = None
        self._plan: Optional[SplitPlan] = None
        self._tok: Optional[Tokenizer] = None
        self._tok_path: Optional[Path] = None
        self._tok_what = ""
        self._tokens_dir: Optional[Path] = None
        self._meta: Optional[Dict] = None
        self._train: Optional[_TrainBatches] = None
        self._val: Optional[_ValBatches] = None
        # train.stages: every stage's batches (StagedBatches), validation per stage
        self._staged: Optional[StagedBatches] = None
        self._staged_val: Optional[StagedValBatches] = None
        # data position: `anchor` (restored or initial) plus batches consumed since
        self._anchor = {"epoch": 0, "windows": 0, "step": 0}
        self._handed_out = 0
        self._loaded: Optional[Dict] = None
        # a mixture: one data module per source, sharing this one's tokenizer
        self._where, self._label = "data.source", ""
        self._mix: Optional[List[MixEntry]] = mix_entries(self.cfg)
        self._stream = None  # data.streaming's StreamingData, made in setup
        if self.cfg.streaming is not None and self._mix is not None:
            raise DataError("data.streaming and data.mix are both set; stream one exported source "
                            "(data.mix=null), or mix local sources (data.streaming=null).")
        if recipe.train.stages and self.cfg.streaming is not None:
            raise DataError("train.stages with data.streaming is not supported: a stage cuts windows of its own "
                            "seq_len from the local token caches and draws them by step, which litdata's chunks "
                            "of a fixed length and its own loader position cannot follow; train the stages on "
                            "local data (data.source or data.mix, data.streaming=null).")
        # every stage's weights over data.mix's sources (a stage naming an unknown one is refused here)
        self._stage_weights = None if self._mix is None else stage_weights(self._mix, stage_plan(recipe))
        self._parts: List[TokenDataModule] = []
        for i, e in enumerate(self._mix or []):
            data = dataclasses.replace(self.cfg, source=e.source, mix=None,
                                       text_field=e.text_field or self.cfg.text_field)
            part = TokenDataModule(dataclasses.replace(recipe, data=data),
                                   verbose=verbose, progress=progress, rank=rank, world_size=world_size)
            part._where, part._label = f"data.mix[{i}].source", e.name
            self._parts.append(part)

    # ------------------------------------------------------------------ helpers

    def _dist(self) -> Tuple[int, int]:
        if self._world is not None:
            return (self._rank or 0), self._world
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _is_rank0(self) -> bool:
        """For printing: before a trainer or process group exists (torchrun runs the
        preparation in every process), the launcher's RANK says who speaks."""
        if self._world is not None or getattr(self, "trainer", None) is not None or (
                torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self._dist()[0] == 0
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0

    def _log(self, msg: str) -> None:
        if self._is_rank0():
            default_log(self._verbose)(f"[{self._label}] {msg}" if self._label else msg)

    def _show_progress(self) -> bool:
        show = self._progress if self._progress is not None else sys.stderr.isatty()
        return bool(self._verbose and show and self._is_rank0())

    def _bar(self, total: Optional[int], desc: str):
        if not self._show_progress():
            return _NoBar()
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc=desc, unit="char", unit_scale=True, leave=False)

    @property
    def corpus(self) -> Corpus:
        if self._mix is not None:
            raise AttributeError("a mixture has no single corpus; see its sources' data modules (_parts)")
        if self._corpus is None:
            self._corpus = Corpus(self.cfg, self._where)  # raises when a path matches nothing
        return self._corpus

    def _get_plan(self) -> SplitPlan:
        if self._plan is None:
            bar = self._bar(self.cfg.max_chars, "reading corpus")
            self._plan = self.corpus.plan(progress=bar.update)  # raises on an empty corpus
            bar.close()
            p = self._plan
            self._log(f"corpus: {self.corpus.describe()}: {p.n_docs:,} documents, {p.chars:,} chars "
                      f"({p.train_chars:,} train, {p.val_chars:,} validation)")
        return self._plan

    # ------------------------------------------------------------- preparation

    def prepare_tokenizer(self) -> Tokenizer:
        """Load data.tokenizer, or the cached BPE for this corpus, training it if
        missing. Checks it against model.vocab_size. Idempotent."""
        if self._tok is not None:
            return self._tok
        if self.cfg.streaming is not None and not self.cfg.tokenizer:
            raise DataError(f"data.streaming needs data.tokenizer, the tokenizer its chunks were written with "
                            f"(the export puts it at {self.cfg.streaming.rstrip('/')}/tokenizer.json).")
        if self.cfg.streaming is not None:
            corpora = []  # no corpus is read
        else:
            corpora = [p.corpus for p in self._parts] if self._mix is not None else [self.corpus]  # path errors first
        model_vocab = self.recipe.model.vocab_size
        if self.cfg.tokenizer:
            what = f"'{self.cfg.tokenizer}'"
            tok = load_tokenizer_file(self.cfg.tokenizer)
            check_vocab(tok, model_vocab, what)
            path = tokenizer_file(self.cfg.tokenizer)
        else:
            what = "trained on the corpus"
            check_folder(self.cache_dir, "data.cache_dir", "set data.cache_dir to a folder")
            if self._mix is None:
                key = _hash(corpora[0].key(), model_vocab, BPE_VERSION, BPE_MAX_CHARS)
            else:
                key = _hash([c.key() for c in corpora], [e.weight for e in self._mix], model_vocab, BPE_VERSION,
                            BPE_MAX_CHARS)
            path = self.cache_dir / f"bpe-{key}.json"
            with writing("the data cache", self.cache_dir, CACHE_FIX):
                tok, cached = _read_or_build(path, lambda: self._cached_bpe(path),
                                             lambda: self._train_bpe(path, model_vocab))
            if cached:
                self._log(f"tokenizer: cached BPE, {vocab_size(tok):,} tokens ({path})")
            check_vocab(tok, model_vocab, what)
        eos_id(tok, what)  # fails now, not at the first document
        self._tok, self._tok_path, self._tok_what = tok, path, what
        for p in self._parts:
            p._tok, p._tok_path, p._tok_what = tok, path, what
        return tok

    @staticmethod
    def _cached_bpe(path: Path) -> Optional[Tokenizer]:
        try:
            return Tokenizer.from_file(str(path)) if path.is_file() else None
        except Exception:  # unreadable: train again
            return None

    def _bpe_texts(self, budget: int) -> Iterator[str]:
        """The training split's first `budget` characters, in pieces."""
        left = budget
        for text in self.corpus.split(self._get_plan(), "train"):
            for piece in chunks(text[:left], CHUNK_CHARS):
                yield piece
            left -= len(text)
            if left <= 0:
                return

    def _mix_bpe_texts(self) -> Iterator[str]:
        """A sample of the sources' training splits in the proportions of their weights:
        the largest that fits BPE_MAX_CHARS and every source's size (a source with a
        large weight and little text shrinks everyone's share)."""
        sizes = [p._get_plan().train_chars for p in self._parts]
        total = min([BPE_MAX_CHARS] + [n / e.weight for n, e in zip(sizes, self._mix)])
        for p, e in zip(self._parts, self._mix):
            yield from p._bpe_texts(max(1, int(total * e.weight)))

    def _train_bpe(self, path: Path, model_vocab: int) -> Tokenizer:
        t0 = time.time()
        if self._mix is None:
            texts = self._bpe_texts(BPE_MAX_CHARS)
            self._get_plan()
            self._log(f"tokenizer: training a byte-level BPE of {model_vocab:,} tokens on the training split")
        else:
            texts = self._mix_bpe_texts()
            self._log(f"tokenizer: training a byte-level BPE of {model_vocab:,} tokens on a weighted sample of "
                      f"the {len(self._parts)} sources' training splits")
        tok = train_bpe(texts, model_vocab, show_progress=self._show_progress())
        save_atomic(tok, path)
        tok = Tokenizer.from_file(str(path))  # hash and use exactly what was saved
        self._log(f"tokenizer: {vocab_size(tok):,} tokens in {time.time() - t0:.1f}s, saved to {path}")
        return tok

    def prepare_data(self) -> None:
        """Check the inputs, get the tokenizer and tokenize the corpus into the cache
        (skipped when a complete cache exists). Safe to call again, from any rank."""
        if self._meta is not None:
            return
        tok = self.prepare_tokenizer()
        if self._mix is not None:
            self._meta = self._mix_meta(tok)
            return
        if self.cfg.streaming is not None:
            from lit_modules.data.streaming import litdata

            litdata()  # installed: said now, before any work
            self._meta = {"streaming": self.cfg.streaming, "tokenizer": str(self._tok_path),
                          "tokenizer_sha": tokenizer_sha(tok)}
            return
        check_folder(self.cache_dir, "data.cache_dir", "set data.cache_dir to a folder")
        folder = self.cache_dir / f"tokens-{_hash(self.corpus.key(), tokenizer_sha(tok), CACHE_VERSION)}"
        with writing("the data cache", folder, CACHE_FIX):
            meta, cached = _read_or_build(folder, lambda: self._read_cache(folder, tok),
                                          lambda: self._tokenize(folder, tok))
        if cached:
            self._log(f"tokens: cached, {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation ({folder})")
        self._tokens_dir, self._meta = folder, meta

    def _mix_meta(self, tok: Tokenizer) -> Dict:
        """Each source prepared (tokenized and cached on its own); their counts summed,
        each source's meta under "sources"."""
        for p in self._parts:
            p.prepare_data()
        metas = [p._meta for p in self._parts]
        sums = {k: sum(int(m[k]) for m in metas) for k in ("train_tokens", "val_tokens", "train_chars", "val_chars",
                                                              "documents")}
        return {"version": CACHE_VERSION, "dtype": metas[0]["dtype"], "eos_id": metas[0]["eos_id"],
                "vocab_size": metas[0]["vocab_size"], **sums, "tokenizer": str(self._tok_path),
                "tokenizer_sha": tokenizer_sha(tok),
                "sources": {e.name: {"weight": e.weight, "cache": str(p._tokens_dir), **m}
                            for e, p, m in zip(self._mix, self._parts, metas)}}

    def _read_cache(self, folder: Path, tok: Tokenizer) -> Optional[Dict]:
        """The cache's meta.json if the cache is complete and its files are what
        meta.json says, else None (rebuilt). A complete cache whose contents disagree
        (sizes, an id outside the vocabulary) is corrupt: said, and rebuilt."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None  # not finished (meta.json is written last)
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            return None
        problem = self._cache_problem(folder, meta, tok)
        if problem is None:
            return meta
        print(f"moelab data: the token cache {folder} is corrupt ({problem}); rebuilding it.",
              file=sys.stderr, flush=True)
        (folder / "meta.json").unlink(missing_ok=True)  # unfinished, for every process, until rebuilt
        return None

    def _cache_problem(self, folder: Path, meta: Dict, tok: Tokenizer) -> Optional[str]:
        """What in a complete cache disagrees with its meta.json and the tokenizer
        (None: nothing). Every id is read: an id past the vocabulary would otherwise
        surface as an index error in the embedding, mid-training."""
        vocab = vocab_size(tok)
        try:
            dtype = np.dtype(meta["dtype"])
            if dtype not in (np.uint16, np.uint32) or meta["vocab_size"] != vocab:
                return f"meta.json says {meta['dtype']} ids of a {meta['vocab_size']}-token vocabulary, the " \
                       f"tokenizer has {vocab}"
            if meta["eos_id"] != eos_id(tok, self._tok_what):
                return f"meta.json's end-of-text id {meta['eos_id']} is not the tokenizer's"
            for split in ("train", "val"):
                path, n = folder / f"{split}.bin", int(meta[f"{split}_tokens"])
                size = path.stat().st_size
                if size != n * dtype.itemsize:
                    return f"{path.name} holds {size:,} bytes, meta.json says {n:,} tokens of {dtype.itemsize}"
                if n == 0:
                    continue
                ids = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
                top = max(int(ids[i:i + SCAN_TOKENS].max()) for i in range(0, n, SCAN_TOKENS))
                del ids
                if top >= vocab:
                    return f"{path.name} holds the id {top:,}, past the tokenizer's {vocab:,} tokens"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    def _tokenize(self, folder: Path, tok: Tokenizer) -> Dict:
        plan = self._get_plan()
        folder.mkdir(parents=True, exist_ok=True)
        vocab = vocab_size(tok)
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
        eos = eos_id(tok, self._tok_what)
        t0 = time.time()
        counts, chars = {}, {}
        for split in ("train", "val"):
            final = folder / f"{split}.bin"
            tmp = _tmp_name(final)
            bar = self._bar(plan.train_chars if split == "train" else plan.val_chars, f"tokenizing {split}")
            try:
                counts[split], chars[split] = self._encode(tok, self.corpus.split(plan, split), eos, dtype, tmp,
                                                           bar)
                os.replace(tmp, final)
            finally:
                bar.close()
                tmp.unlink(missing_ok=True)  # a failed write (disk full, a bad file) leaves nothing behind
        meta = {
            "version": CACHE_VERSION, "dtype": dtype, "eos_id": eos, "vocab_size": vocab,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_chars": chars["train"], "val_chars": chars["val"], "documents": plan.n_docs,
            "corpus": self.corpus.describe(), "tokenizer": str(self._tok_path),
            "tokenizer_sha": tokenizer_sha(tok),
        }
        tmp = _tmp_name(folder / "meta.json")
        try:
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, folder / "meta.json")  # last: this makes the cache complete
        finally:
            tmp.unlink(missing_ok=True)
        _remove_stale_tmp(folder)
        total = counts["train"] + counts["val"]
        self._log(f"tokens: {counts['train']:,} train + {counts['val']:,} validation "
                  f"({(chars['train'] + chars['val']) / max(total, 1):.2f} chars/token) in "
                  f"{time.time() - t0:.1f}s, cached in {folder}")
        return meta

    def _encode(self, tok: Tokenizer, texts, eos: int, dtype: str, out: Path, bar) -> Tuple[int, int]:
        """Encode documents in batches of about ENCODE_BATCH_CHARS, append them to `out`
        each followed by eos; returns (tokens, characters). With data.num_proc > 1 the
        batches are encoded by worker processes and written in their order, so the
        file is the one a single process writes."""
        n_tok = n_chars = 0
        with open(out, "wb") as f, _Encoder(tok, eos, dtype, self.cfg.num_proc) as enc:
            def write(arr: np.ndarray, size: int) -> None:
                nonlocal n_tok
                arr.tofile(f)
                n_tok += arr.size
                bar.update(size)

            pending: List[str] = []
            ends: List[bool] = []
            size = 0
            for text in texts:
                n_chars += len(text)
                pieces = list(chunks(text, CHUNK_CHARS))
                for i, piece in enumerate(pieces):
                    pending.append(piece)
                    ends.append(i == len(pieces) - 1)
                    size += len(piece)
                    if size >= ENCODE_BATCH_CHARS:
                        enc.submit(pending, ends, size, write)
                        pending, ends, size = [], [], 0
            if pending:
                enc.submit(pending, ends, size, write)
            enc.drain(write)
        return n_tok, n_chars

    # ------------------------------------------------------------------- setup

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is not None:
            return
        self.prepare_data()  # cheap when the cache exists (every rank finds it)
        if self.cfg.streaming is not None:
            if self._stream is None:
                from lit_modules.data.streaming import StreamingData

                self._stream = StreamingData(self.cfg.streaming, self.recipe, self.cfg.num_workers)
                if self._loaded is not None:
                    self._stream.load_state_dict(self._loaded)
                    self._loaded = None
            return
        if self._mix is not None:
            self._setup_mix()
        else:
            self._setup_one()
        if self._loaded is not None:
            self._apply_state(self._loaded)
            self._loaded = None

    def _setup_mix(self) -> None:
        """The mixture's training batches and per-source validation, per stage (one stage
        without train.stages): the sources' token caches are shared, each stage cuts its
        own windows from them and draws by its own weights."""
        t = self.recipe.train
        rank, world = self._dist()
        plan = stage_plan(self.recipe)
        segments, vals = [], []  # vals[k][i]: stage k's validation batches of source i
        for st, weights in zip(plan, self._stage_weights):
            seg, val = self._mix_stage(st, weights, rank, world)
            segments.append(seg)
            vals.append(val)
        self._train = segments[0]
        if vals[0] is not None:
            self._val = vals[0]
        if t.stages:
            self._staged = StagedBatches(segments, [st.start for st in plan])
            if vals[0] is not None:
                current = lambda: stage_after(plan, self._trainer_step() or 0).index  # noqa: E731
                self._val = [StagedValBatches([v[i] for v in vals], current) for i in range(len(self._mix))]

    def _mix_stage(self, st, weights, rank: int, world: int):
        """(training batches, validation batches per source or None) of one stage."""
        t = self.recipe.train
        window = st.seq_len + 1
        named = f" in stage '{st.name}'" if t.stages else ""
        fix = f"train.stages[{st.index}].seq_len" if t.stages and st.index > 0 else "train.seq_len"
        trains, vals = [], []
        for e, p, w_i in zip(self._mix, self._parts, weights):
            meta = p._meta
            w = _Windows(p._tokens_dir / "train.bin", meta["dtype"], meta["train_tokens"], window)
            if w.n == 0 and w_i > 0:
                raise DataError(f"the training split of data.mix source '{e.name}' has {meta['train_tokens']:,} "
                                f"tokens, fewer than one sequence of seq_len + 1 = {window}{named}; raise "
                                f"data.max_chars, lower {fix}, or drop the source.")
            trains.append(w)
            if meta["val_tokens"] > 0:
                v = _Windows(p._tokens_dir / "val.bin", meta["dtype"], meta["val_tokens"], window)
                if v.n == 0:
                    raise DataError(f"the validation split of data.mix source '{e.name}' has "
                                    f"{meta['val_tokens']:,} tokens, fewer than one sequence of seq_len + 1 "
                                    f"= {window}{named}; raise data.val_fraction or data.max_chars, or set "
                                    f"data.val_fraction=0 to train without validation.")
                vals.append(_ValBatches(v, st.micro_batch_size, t.val_batches, rank, world))
        # stage 0 is seeded as a mixture without stages; a later stage by (seed, its index)
        salt = (st.index,) if st.index > 0 else ()
        mixed = MixWindows(trains, weights, t.seed, salt=salt)
        train = _MixTrainBatches(mixed, st.rows, rank, world, t.seed)
        if train.batches_per_epoch == 0:
            raise DataError(
                f"the mixture's training splits hold {mixed.n:,} windows of {window} tokens, fewer than one step "
                f"needs{named} ({st.rows} x {world} rank(s)); raise data.max_chars or lower the seq_len / "
                f"micro_batch_size / grad_accum.")
        steps = st.steps if t.stages else train.batches_per_epoch
        for e, w, share in zip(self._mix, trains, mixed.schedule.w):
            if share > 0:
                self._log(f"mix{named}: {e.name} {share:.1%} of the windows, {w.n:,} windows of its own (each seen "
                          f"{share * steps * train.step_windows / w.n:.2f} times in {steps:,} steps)")
        return train, (vals or None)

    def _setup_one(self) -> None:
        """The one source's training batches and validation, per stage (one stage without
        train.stages), as _setup_mix does for a mixture."""
        rank, world = self._dist()
        plan = stage_plan(self.recipe)
        built = [self._one_stage(st, rank, world) for st in plan]
        segments, vals = [b[0] for b in built], [b[1] for b in built]
        self._train, self._val = segments[0], vals[0]
        if self.recipe.train.stages:
            self._staged = StagedBatches(segments, [st.start for st in plan])
            if vals[0] is not None:
                self._staged_val = StagedValBatches(vals, lambda: stage_after(plan, self._trainer_step() or 0).index)

    def _one_stage(self, st, rank: int, world: int):
        """(training batches, validation batches or None) of stage `st` in its own windows;
        a step or a sequence the data cannot fill is refused, naming the fields to change
        (the stage's own with train.stages, else train.*)."""
        meta, t = self._meta, self.recipe.train
        window = st.seq_len + 1
        train = _TrainBatches(_Windows(self._tokens_dir / "train.bin", meta["dtype"], meta["train_tokens"], window),
                              st.rows, rank, world, t.seed, salt=(st.index,) if st.index > 0 else ())
        of_stage = f" of stage '{st.name}'" if t.stages else ""
        seq = f"train.stages[{st.index}].seq_len" if t.stages else "train.seq_len"
        fields = f"{seq} / micro_batch_size / grad_accum" if t.stages else \
            "train.seq_len / train.micro_batch_size / train.grad_accum"
        if train.batches_per_epoch == 0:
            raise DataError(
                f"the training split has {meta['train_tokens']:,} tokens, fewer than one step{of_stage} needs "
                f"({st.rows} x {world} rank(s) x {window} = {st.rows * world * window:,}); raise data.max_chars or "
                f"lower {fields}.")
        if meta["val_tokens"] <= 0:
            return train, None
        val = _Windows(self._tokens_dir / "val.bin", meta["dtype"], meta["val_tokens"], window)
        if val.n == 0:
            raise DataError(
                f"the validation split has {meta['val_tokens']:,} tokens, fewer than one sequence{of_stage} of "
                f"{seq} + 1 = {window}; raise data.val_fraction or data.max_chars, or set data.val_fraction=0 to "
                f"train without validation.")
        return train, _ValBatches(val, st.micro_batch_size, t.val_batches, rank, world)

    # -------------------------------------------------------------- properties

    @property
    def tokenizer(self) -> Tokenizer:
        return self.prepare_tokenizer()

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer.json in use (the given one or the cached BPE)."""
        self.prepare_tokenizer()
        return self._tok_path

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs for this tokenizer (<= model.vocab_size, checked)."""
        return vocab_size(self.prepare_tokenizer())

    @property
    def eos_id(self) -> int:
        return eos_id(self.prepare_tokenizer(), self._tok_what)

    @property
    def meta(self) -> Dict:
        """The cache's meta.json: token and character counts, dtype, tokenizer hash."""
        self.prepare_data()
        return dict(self._meta)

    @property
    def train_tokens(self) -> int:
        return self.meta["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["val_tokens"]

    @property
    def batches_per_epoch(self) -> int:
        """Training batches (= optimizer steps) per epoch, per rank."""
        self.setup()
        if self._stream is not None:
            return len(self._stream.train_loader())
        return self._train.batches_per_epoch

    # ------------------------------------------------------------- dataloaders

    def _loader_kwargs(self) -> Dict:
        if self.cfg.num_workers > 0:
            # workers never tokenize; this silences tokenizers' warning at each fork
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return {"num_workers": self.cfg.num_workers, "pin_memory": torch.cuda.is_available()}

    def train_dataloader(self) -> DataLoader:
        """Batches of shape (micro_batch_size * grad_accum, seq_len + 1), one per
        optimizer step; iterating again continues from the data position."""
        self.setup()
        if self._stream is not None:
            return self._stream.train_loader()
        return _TrainLoader(self._staged or self._train, self, **self._loader_kwargs())

    def val_dataloader(self):
        """Fixed validation batches (micro_batch_size, seq_len + 1); [] when
        data.val_fraction is 0; for a mixture, a list of loaders, one per source in
        data.mix's order (the module logs each as val/<name>/loss)."""
        self.setup()
        if self._stream is not None:
            return self._stream.val_loader()
        if self._val is None:
            return []
        if isinstance(self._val, list):
            return [DataLoader(v, batch_size=None, **self._loader_kwargs()) for v in self._val]
        return DataLoader(self._staged_val or self._val, batch_size=None, **self._loader_kwargs())

    def all_rank_batches(self, step_windows: int, steps: int) -> Iterator[torch.Tensor]:
        """The training windows of optimizer steps 0 .. steps - 1 over all ranks, one
        (step_windows, seq_len + 1) tensor a step, step_windows being micro_batch_size
        x grad_accum x world size: rank r of W trains on rows r::W of each (the order
        above). The offline distillation cache is built from these."""
        self.setup()
        if self._stream is not None or self._staged is not None:
            raise DataError("the windows of every rank are laid out here for one-stage runs on the token cache; "
                            "data.streaming and train.stages order their batches elsewhere.")
        ds = self._train
        full = type(ds)(ds.windows, step_windows, 0, 1, ds.seed, ds.salt)  # one rank holding the whole step
        if full.batches_per_epoch == 0:
            raise DataError(f"the training split holds {ds.windows.n:,} windows, fewer than one step of "
                            f"{step_windows}; raise data.max_chars or lower the batch.")
        epoch, order = None, None
        for s in range(steps):
            e, b = divmod(s, full.batches_per_epoch)
            if e != epoch:
                epoch, order = e, full.order(e)
            yield full.windows.batch(full.batch_ids(order, b))

    @property
    def mix_names(self) -> Optional[List[str]]:
        """The sources' names of a mixture (the validation loaders' order), else None."""
        return None if self._mix is None else [e.name for e in self._mix]

    # ------------------------------------------------------------------ resume

    def _trainer_step(self) -> Optional[int]:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else int(trainer.global_step)

    def _next_step(self) -> int:
        """The optimizer step whose batch comes next (staged runs: their position)."""
        step = self._trainer_step()
        if step is not None:
            return step
        return int(self._anchor.get("step") or 0) + self._handed_out

    def _position(self) -> Tuple[int, int]:
        """(epoch, batch within the epoch) of the next training batch."""
        ds = self._train
        step = self._trainer_step()
        if step is not None:
            if self._anchor["step"] is None:  # restored from a run without a trainer
                self._anchor["step"] = step
            consumed = step - self._anchor["step"]
        else:
            consumed = self._handed_out
        b = self._anchor["windows"] // ds.step_windows + max(consumed, 0)
        return self._anchor["epoch"] + b // ds.batches_per_epoch, b % ds.batches_per_epoch

    def state_dict(self) -> Dict:
        """Where the training data stands: epoch and windows consumed in it (over all
        ranks), with what they depend on. Saved by Lightning in every checkpoint."""
        if self._stream is not None:
            return self._stream.state_dict()
        if self._train is None:
            return dict(self._loaded) if self._loaded else {"version": 1, **self._anchor}
        if self._staged is not None:
            step = self._next_step()
            k, seg, epoch, b = self._staged.locate(step)
            return {"version": 1, "step": step, "stage": k, "epoch": epoch, "windows": b * seg.step_windows,
                    "seed": seg.seed, "tokenizer_sha": self._meta.get("tokenizer_sha") if self._meta else None,
                    "mix": self._stage_mixes()}
        epoch, b = self._position()
        return {
            "version": 1, "epoch": epoch, "windows": b * self._train.step_windows,
            "step": self._trainer_step(), "seed": self._train.seed,
            "step_windows": self._train.step_windows, "train_windows": self._train.windows.n,
            "tokenizer_sha": self._meta.get("tokenizer_sha") if self._meta else None,
            "mix": None if self._mix is None else {e.name: e.weight for e in self._mix},
        }

    def _stage_mixes(self) -> Optional[List[Dict[str, float]]]:
        """Each stage's weights per source (a mixture's), as checkpoints record them."""
        if self._stage_weights is None:
            return None
        return [{e.name: float(w) for e, w in zip(self._mix, ws)} for ws in self._stage_weights]

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a saved position. Before setup() the state is kept and applied
        there (Lightning restores the data module after setup)."""
        if self._stream is not None:
            self._stream.load_state_dict(state)
        elif self._train is None:
            self._loaded = dict(state)
        else:
            self._apply_state(state)

    def _apply_state(self, state: Dict) -> None:
        if self._staged is not None:  # the step places everything
            if state.get("mix", None) not in (None, self._stage_mixes()):
                warnings.warn("the stages' data mixtures differ from the checkpoint's (data.mix or a "
                              "train.stages[*].mix changed); training continues from the same step, drawing by "
                              "the new weights.", stacklevel=2)
            self._anchor = {"epoch": 0, "windows": 0, "step": int(state.get("step") or 0)}
            self._handed_out = 0
            return
        ds = self._train
        mix = None if self._mix is None else {e.name: e.weight for e in self._mix}
        same = (state.get("seed", ds.seed) == ds.seed and state.get("train_windows", ds.windows.n) == ds.windows.n
                and state.get("mix", mix) == mix)
        if not same:
            warnings.warn(
                "the data of the checkpoint differs from this run's (another seed, corpus, mix, tokenizer or "
                "seq_len); training continues from the same epoch and position, on the new data order.",
                stacklevel=2,
            )
        # With another batch or world size, `windows // step_windows` in _position
        # resumes at the first step not fully seen (a few windows may be seen twice).
        self._anchor = {"epoch": int(state.get("epoch", 0)), "windows": int(state.get("windows", 0)),
                        "step": state.get("step")}
        self._handed_out = 0


def load_or_train_tokenizer(recipe, *, verbose: bool = True, progress: Optional[bool] = None) -> Tokenizer:
    """The tokenizer a recipe trains with: `data.tokenizer` if set, else the BPE
    trained on the recipe's training split (cached under data.cache_dir). Checks that
    it fits model.vocab_size."""
    dm = TokenDataModule(recipe, verbose=verbose, progress=progress)
    return dm.prepare_tokenizer()
