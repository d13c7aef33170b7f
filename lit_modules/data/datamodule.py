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

With train.stages, each stage has its own windows and batch size, and the batch of a
step is a function of the step (lit_modules/data/staged.py); the position saved is
the step.
"""
from __future__ import annotations

import contextlib
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
from lit_modules.data.staged import StagedBatches, StagedValBatches
from lit_modules.disk import check_folder, writing
from lit_modules.data.tokenizer import (
    BPE_MAX_CHARS, BPE_VERSION, Tokenizer, check_vocab, default_log, eos_id,
    load_tokenizer_file, save_atomic, tokenizer_file, tokenizer_sha,
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
            default_log(self._verbose)(msg)

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
        if self._corpus is None:
            self._corpus = Corpus(self.cfg)  # raises when a path matches nothing
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
        corpus = self.corpus
        model_vocab = self.recipe.model.vocab_size
        if self.cfg.tokenizer:
            what = f"'{self.cfg.tokenizer}'"
            tok = load_tokenizer_file(self.cfg.tokenizer)
            check_vocab(tok, model_vocab, what)
            path = tokenizer_file(self.cfg.tokenizer)
        else:
            what = "trained on the corpus"
            check_folder(self.cache_dir, "data.cache_dir", "set data.cache_dir to a folder")
            path = self.cache_dir / f"bpe-{_hash(corpus.key(), model_vocab, BPE_VERSION, BPE_MAX_CHARS)}.json"
            with writing("the data cache", self.cache_dir, CACHE_FIX):
                tok, cached = _read_or_build(path, lambda: self._cached_bpe(path),
                                             lambda: self._train_bpe(path, model_vocab))
            if cached:
                self._log(f"tokenizer: cached BPE, {vocab_size(tok):,} tokens ({path})")
            check_vocab(tok, model_vocab, what)
        eos_id(tok, what)  # fails now, not at the first document
        self._tok, self._tok_path, self._tok_what = tok, path, what
        return tok

    @staticmethod
    def _cached_bpe(path: Path) -> Optional[Tokenizer]:
        try:
            return Tokenizer.from_file(str(path)) if path.is_file() else None
        except Exception:  # unreadable: train again
            return None

    def _train_bpe(self, path: Path, model_vocab: int) -> Tokenizer:
        plan = self._get_plan()
        t0 = time.time()
        self._log(f"tokenizer: training a byte-level BPE of {model_vocab:,} tokens on the training split")

        def texts():
            left = BPE_MAX_CHARS
            for text in self.corpus.split(plan, "train"):
                for piece in chunks(text[:left], CHUNK_CHARS):
                    yield piece
                left -= len(text)
                if left <= 0:
                    return

        tok = train_bpe(texts(), model_vocab, show_progress=self._show_progress())
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
        check_folder(self.cache_dir, "data.cache_dir", "set data.cache_dir to a folder")
        folder = self.cache_dir / f"tokens-{_hash(self.corpus.key(), tokenizer_sha(tok), CACHE_VERSION)}"
        with writing("the data cache", folder, CACHE_FIX):
            meta, cached = _read_or_build(folder, lambda: self._read_cache(folder, tok),
                                          lambda: self._tokenize(folder, tok))
        if cached:
            self._log(f"tokens: cached, {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation ({folder})")
        self._tokens_dir, self._meta = folder, meta

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

    @staticmethod
    def _encode(tok: Tokenizer, texts, eos: int, dtype: str, out: Path, bar) -> Tuple[int, int]:
        """Encode documents in batches, append them to `out` each followed by eos;
        returns (tokens, characters)."""
        n_tok = n_chars = 0
        pending: List[str] = []
        ends: List[bool] = []
        size = 0
        with open(out, "wb") as f:
            def flush():
                nonlocal n_tok, size
                ids: List[int] = []
                for enc, end in zip(tok.encode_batch(pending, add_special_tokens=False), ends):
                    ids.extend(enc.ids)
                    if end:
                        ids.append(eos)
                arr = np.asarray(ids, dtype=dtype)
                arr.tofile(f)
                n_tok += arr.size
                bar.update(size)
                pending.clear(), ends.clear()
                size = 0

            for text in texts:
                n_chars += len(text)
                pieces = list(chunks(text, CHUNK_CHARS))
                for i, piece in enumerate(pieces):
                    pending.append(piece)
                    ends.append(i == len(pieces) - 1)
                    size += len(piece)
                    if size >= ENCODE_BATCH_CHARS:
                        flush()
            if pending:
                flush()
        return n_tok, n_chars

    # ------------------------------------------------------------------- setup

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is not None:
            return
        self.prepare_data()  # cheap when the cache exists (every rank finds it)
        meta, t = self._meta, self.recipe.train
        rank, world = self._dist()
        plan = stage_plan(self.recipe)
        window = plan[0].seq_len + 1  # without stages: train.seq_len
        batch = plan[0].rows
        train = _Windows(self._tokens_dir / "train.bin", meta["dtype"], meta["train_tokens"], window)
        self._train = _TrainBatches(train, batch, rank, world, t.seed)
        if self._train.batches_per_epoch == 0:
            need = batch * world * window
            self._train = None
            raise DataError(
                f"the training split has {meta['train_tokens']:,} tokens, fewer than one step needs "
                f"({batch} x {world} rank(s) x {window} = {need:,}); raise data.max_chars or lower "
                f"train.seq_len / train.micro_batch_size / train.grad_accum."
            )
        if meta["val_tokens"] > 0:
            val = _Windows(self._tokens_dir / "val.bin", meta["dtype"], meta["val_tokens"], window)
            if val.n == 0:
                self._train = None
                raise DataError(
                    f"the validation split has {meta['val_tokens']:,} tokens, fewer than one sequence of "
                    f"train.seq_len + 1 = {window}; raise data.val_fraction or data.max_chars, or set "
                    f"data.val_fraction=0 to train without validation."
                )
            self._val = _ValBatches(val, plan[0].micro_batch_size, t.val_batches, rank, world)
        if t.stages:
            self._setup_stages(plan, rank, world)
        if self._loaded is not None:
            self._apply_state(self._loaded)
            self._loaded = None

    def _setup_stages(self, plan, rank: int, world: int) -> None:
        """Each stage's training windows and validation batches (stage 0's are those
        made above); a stage whose batch does not fit the data is refused, naming it."""
        meta, t = self._meta, self.recipe.train
        segments, vals = [self._train], [self._val]
        for st in plan[1:]:
            window = st.seq_len + 1
            seg = _TrainBatches(_Windows(self._tokens_dir / "train.bin", meta["dtype"], meta["train_tokens"], window),
                                st.rows, rank, world, t.seed, salt=(st.index,))
            val = None
            if meta["val_tokens"] > 0:
                val = _Windows(self._tokens_dir / "val.bin", meta["dtype"], meta["val_tokens"], window)
            if seg.batches_per_epoch == 0:
                self._train = None
                raise DataError(
                    f"the training split has {meta['train_tokens']:,} tokens, fewer than one step of stage "
                    f"'{st.name}' needs ({st.rows} x {world} rank(s) x {window} = {st.rows * world * window:,}); "
                    f"raise data.max_chars or lower train.stages[{st.index}].seq_len / micro_batch_size / "
                    f"grad_accum.")
            if val is not None and val.n == 0:
                self._train = None
                raise DataError(
                    f"the validation split has {meta['val_tokens']:,} tokens, fewer than one sequence of stage "
                    f"'{st.name}' (seq_len + 1 = {window}); raise data.val_fraction or data.max_chars, or set "
                    f"data.val_fraction=0 to train without validation.")
            segments.append(seg)
            vals.append(_ValBatches(val, st.micro_batch_size, t.val_batches, rank, world) if val is not None else None)
        self._staged = StagedBatches(segments, [st.start for st in plan])
        if self._val is not None:
            self._staged_val = StagedValBatches(vals, lambda: stage_after(plan, self._trainer_step() or 0).index)

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
        return _TrainLoader(self._staged or self._train, self, **self._loader_kwargs())

    def val_dataloader(self):
        """Fixed validation batches (micro_batch_size, seq_len + 1); [] when
        data.val_fraction is 0."""
        self.setup()
        if self._val is None:
            return []
        return DataLoader(self._staged_val or self._val, batch_size=None, **self._loader_kwargs())

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
        if self._train is None:
            return dict(self._loaded) if self._loaded else {"version": 1, **self._anchor}
        if self._staged is not None:
            step = self._next_step()
            k, seg, epoch, b = self._staged.locate(step)
            return {"version": 1, "step": step, "stage": k, "epoch": epoch, "windows": b * seg.step_windows,
                    "seed": seg.seed, "tokenizer_sha": self._meta.get("tokenizer_sha") if self._meta else None}
        epoch, b = self._position()
        return {
            "version": 1, "epoch": epoch, "windows": b * self._train.step_windows,
            "step": self._trainer_step(), "seed": self._train.seed,
            "step_windows": self._train.step_windows, "train_windows": self._train.windows.n,
            "tokenizer_sha": self._meta.get("tokenizer_sha") if self._meta else None,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a saved position. Before setup() the state is kept and applied
        there (Lightning restores the data module after setup)."""
        if self._train is None:
            self._loaded = dict(state)
        else:
            self._apply_state(state)

    def _apply_state(self, state: Dict) -> None:
        if self._staged is not None:  # the step places everything
            self._anchor = {"epoch": 0, "windows": 0, "step": int(state.get("step") or 0)}
            self._handed_out = 0
            return
        ds = self._train
        same = (state.get("seed", ds.seed) == ds.seed and state.get("train_windows", ds.windows.n) == ds.windows.n)
        if not same:
            warnings.warn(
                "the data of the checkpoint differs from this run's (another seed, corpus, tokenizer or "
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
