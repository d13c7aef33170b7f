"""Streaming token data for multi-node runs, through Lightning's litdata (optional).

The token cache of TokenDataModule is a pair of memmaps on the machine that
tokenized: right for one host, or for several hosts that share a file system with
room for every rank to memory-map the whole stream. Past that (many nodes, data on an
object store such as S3, corpora larger than a node's disk), `data.streaming` names a
litdata dataset instead: token chunks that each rank downloads (and caches) as it goes,
shuffled by litdata, with a resumable loader state that Lightning saves in checkpoints.

    python -m lit_modules.data.export_stream RECIPE OUT [a.b=c ...]   # tokenize (cached), then
                                                                  # write OUT/train, OUT/val
    moelab train RECIPE data.streaming=OUT data.tokenizer=OUT/tokenizer.json

OUT may be a local or shared folder; copy it to an object store (s3://...) and name
that URL. The order of batches is litdata's (seeded by train.seed), not moelab's
windows; each rank reads its own share. moelab reads no files itself here.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from lit_modules.data.corpus import DataError

EXPORT_CHUNK_TOKENS = 1 << 22  # tokens per litdata chunk (each rank downloads whole chunks)


def litdata():
    try:
        import litdata as ld
    except ImportError:
        raise DataError("data.streaming needs litdata, which is not installed; pip install 'moelab[streaming]' "
                        "(or pip install litdata), or set data.streaming=null to use the local token cache.") from None
    return ld


def _piece(item):
    """One export input (bin path, dtype, start, end) as a token tensor (litdata's fn)."""
    path, dtype, start, end, n = item
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(n,))[start:end]
    yield torch.from_numpy(ids.astype(np.int32))


def export(dm, out: str, *, num_workers: int = 1, chunk_tokens: int = EXPORT_CHUNK_TOKENS) -> Dict[str, int]:
    """Write a data module's token cache as litdata token chunks: OUT/train, OUT/val
    and OUT/tokenizer.json. Returns the tokens written per split."""
    ld = litdata()
    if dm._mix is not None:
        raise DataError("data.streaming export takes one source, not a data.mix: a mixture's weights would not "
                        "survive; export each source and mix them with litdata's CombinedStreamingDataset.")
    dm.prepare_data()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import multiprocessing as mp

    # fork: the workers need no re-import of the caller's script (spawn would)
    start = "fork" if "fork" in mp.get_all_start_methods() else None
    written = {}
    for split in ("train", "val"):
        n = int(dm.meta[f"{split}_tokens"])
        written[split] = n
        if n == 0:
            continue
        path = str(dm._tokens_dir / f"{split}.bin")
        inputs = [(path, dm.meta["dtype"], s, min(s + chunk_tokens, n), n) for s in range(0, n, chunk_tokens)]
        ld.optimize(fn=_piece, inputs=inputs, output_dir=str(out / split), chunk_size=chunk_tokens,
                    item_loader=ld.TokensLoader(), num_workers=num_workers, mode="overwrite", verbose=False,
                    start_method=start)
    shutil.copyfile(dm.tokenizer_path, out / "tokenizer.json")
    return written


def _collate(blocks):
    # ids as moelab's own loaders give them (int64: embedding and cross-entropy targets)
    return torch.stack(blocks).long()


class StreamingData:
    """The loaders of data.streaming: litdata datasets of OUT/train and OUT/val, cut
    into blocks of seq_len + 1 tokens. One training loader per data module, so the
    state Lightning restores into it (a stateful loader) is the one that runs."""

    def __init__(self, root: str, recipe, num_workers: int):
        self.ld = litdata()
        self.root, self.recipe, self.num_workers = root.rstrip("/"), recipe, num_workers
        self._train = None
        self._pending: Optional[Dict] = None

    def _dataset(self, split: str, shuffle: bool):
        t = self.recipe.train
        try:
            return self.ld.StreamingDataset(f"{self.root}/{split}", item_loader=self.ld.TokensLoader(
                block_size=t.seq_len + 1), shuffle=shuffle, drop_last=True, seed=t.seed)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"data.streaming '{self.root}' has no readable litdata dataset in {split}/ "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); write it with "
                            f"python -m lit_modules.data.export_stream.") from None

    def train_loader(self):
        if self._train is None:
            t = self.recipe.train
            self._train = self.ld.StreamingDataLoader(self._dataset("train", True),
                                                      batch_size=t.micro_batch_size * t.grad_accum,
                                                      num_workers=self.num_workers, drop_last=True,
                                                      collate_fn=_collate)
            if self._pending is not None:
                self._train.load_state_dict(self._pending)
                self._pending = None
        return self._train

    def val_loader(self):
        if self.recipe.data.val_fraction == 0:
            return []
        return self.ld.StreamingDataLoader(self._dataset("val", False), batch_size=self.recipe.train.micro_batch_size,
                                           num_workers=self.num_workers, drop_last=True, collate_fn=_collate)

    def state_dict(self) -> Dict:
        state = self._train.state_dict() if self._train is not None else self._pending
        return {"version": 1, "streaming": state}

    def load_state_dict(self, state: Dict) -> None:
        inner = state.get("streaming")
        if inner is None:
            return
        if self._train is None:
            self._pending = inner
        else:
            self._train.load_state_dict(inner)
