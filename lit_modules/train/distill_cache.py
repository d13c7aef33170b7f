"""train.distill.mode = offline: the teacher's targets, computed once over exactly the
batches the student will train on, stored on disk and read step by step.

    moelab distill-cache RECIPE [a.b=c ...] [--world N]     build_cache
    moelab train RECIPE train.distill.mode=offline ...      check_cache, then CachedTeacher

Layout of one cache folder (default data.cache_dir/distill-<key>, the key hashing the
teacher's files, the token cache, the seed, seq_len, steps and the distillation
settings; `identity` lists them):

    tokens.npy   (steps, G, seq_len + 1) int32   the windows, to check the alignment
    ids.npy      (steps, G, seq_len, k)  int32   sparse_target's ids (arch/distill.py)
    weights.npy  (steps, G, seq_len, k)  float16 the teacher's probabilities (topk,
                                         sampled) or uint16 draw counts (sampled_counts)
    nll.npy      (steps, G, seq_len)     float32 the teacher's next-token loss (logged)
    meta.json    identity, shapes and file names; written last

G = micro_batch_size x grad_accum x world size: the windows of one optimizer step over
all ranks, in the data module's order (rank r of W reads rows r::W), so row `step` is
what the run trains on at that step, resumed or not. The folder is written under a
temporary name and renamed when complete: a folder with meta.json is whole.
`full` is refused offline: its target is the whole vocabulary per token.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from arch.config import Recipe
from arch.registry import RecipeError

VERSION = 1
META = "meta.json"
FILES = {"tokens": "tokens.npy", "ids": "ids.npy", "weights": "weights.npy", "nll": "nll.npy"}
BUILD = "moelab distill-cache RECIPE (with the train command's overrides)"


def check_offline(recipe: Recipe) -> None:
    """The settings offline mode cannot serve, one sentence each (run.check_train)."""
    cfg, t = recipe.train.distill, recipe.train
    if cfg.kind == "full":
        raise RecipeError("train.distill.kind = full cannot be cached offline: its target is the teacher's whole "
                          "vocabulary for every token; choose topk, sampled or sampled_counts, or mode=online.")
    if cfg.kind == "sampled_counts" and cfg.k > np.iinfo(np.uint16).max:
        raise RecipeError(f"train.distill.k = {cfg.k} draws cannot be counted in the cache's uint16; use at most "
                          f"65535 draws offline.")
    if t.stages:
        raise RecipeError("train.distill.mode = offline does not support train.stages yet (each stage has its own "
                          "windows and batch); use mode=online or train one stage.")
    if recipe.data.streaming is not None:
        raise RecipeError("train.distill.mode = offline needs the token cache's batch order; data.streaming's "
                          "order is litdata's; use mode=online or the token cache.")


def _teacher_files(source: str) -> list:
    """(name, size, mtime_ns) of the teacher's files: a teacher trained further or
    replaced gets another key."""
    path = Path(source).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.relative_to(path)) if p != path else p.name, st.st_size, st.st_mtime_ns])
    return out


def identity(recipe: Recipe, dm) -> Dict:
    """What the cached targets depend on (except the ranks' split, checked at load)."""
    cfg, t = recipe.train.distill, recipe.train
    meta = dm.meta
    tokens = ({n: [s["cache"], s["weight"]] for n, s in meta["sources"].items()} if "sources" in meta
              else str(dm._tokens_dir.name))
    return {"version": VERSION,
            "teacher": {"path": str(Path(cfg.teacher).expanduser().resolve()), "files": _teacher_files(cfg.teacher)},
            "data": {"tokens": tokens, "tokenizer_sha": meta["tokenizer_sha"], "train_tokens": meta["train_tokens"],
                     "seed": t.seed, "seq_len": t.seq_len, "steps": t.max_steps,
                     "document_mask": t.document_mask, "document_positions": t.document_positions},
            "settings": {"kind": cfg.kind, "k": cfg.k, "temperature": cfg.temperature,
                         "student_vocab": recipe.model.vocab_size}}


def _key(ident: Dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_folder(recipe: Recipe, ident: Dict) -> Path:
    cfg = recipe.train.distill
    if cfg.cache:
        return Path(cfg.cache).expanduser()
    return Path(recipe.data.cache_dir).expanduser() / f"distill-{_key(ident)}"


def _difference(want: Dict, have: Dict, where: str = "") -> Optional[str]:
    """The first field where two identities differ, as `name: cached -> wanted`."""
    for k in sorted(set(want) | set(have)):
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            d = _difference(a, b, f"{where}{k}.")
            if d:
                return d
        elif a != b:
            if k == "files":
                return f"{where}{k} (the teacher's files changed since the cache was built)"
            return f"{where}{k}: {b!r} cached, {a!r} wanted"
    return None


def _read_meta(folder: Path) -> Optional[Dict]:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


def check_cache(recipe: Recipe, dm) -> Path:
    """The complete cache for this recipe's teacher, data and settings, else one
    sentence (missing, or made for something else: which field)."""
    ident = identity(recipe, dm)
    folder = cache_folder(recipe, ident)
    meta = _read_meta(folder)
    if meta is None:
        raise RecipeError(f"train.distill.mode = offline: no complete teacher cache at {folder} for this teacher, "
                          f"data and settings; build it first with {BUILD}.")
    diff = _difference(ident, meta.get("identity", {}))
    if diff is not None:
        raise RecipeError(f"train.distill.cache = {folder} was made for another teacher, data or settings ({diff}); "
                          f"build this run's with {BUILD}, or drop train.distill.cache to use its own folder.")
    return folder


def _inside(folder: Path, name: str) -> Path:
    """A file named by meta.json, refused unless it lies directly in the folder."""
    path = (folder / str(name)).resolve()
    if path.parent != folder.resolve():
        raise RecipeError(f"the teacher cache {folder} names the file {name!r}, outside its folder; delete the "
                          f"folder and build it again with {BUILD}.")
    return path


def build_cache(recipe: Recipe, world: int = 1, device: Optional[str] = None, progress: Optional[bool] = None,
                verbose: bool = True) -> Path:
    """Run the teacher over every rank's batches of every step and write the cache;
    an existing complete one is kept. Returns its folder. The recipe has passed
    `lit_modules.train.run.check_train` (the caller's job: run.py imports this module)."""
    from lit_modules.data.datamodule import TokenDataModule, _file_lock
    from lit_modules.disk import writing
    from lit_modules.train.distill import check_teacher

    cfg, t = recipe.train.distill, recipe.train
    if not cfg.teacher or cfg.mode != "offline":
        raise RecipeError("moelab distill-cache needs train.distill.teacher and train.distill.mode=offline in the "
                          "recipe or its overrides.")
    if world < 1:
        raise RecipeError(f"--world {world}: the number of training processes is at least 1.")
    dm = TokenDataModule(recipe, verbose=verbose, progress=progress)
    check_teacher(recipe, dm.prepare_tokenizer())
    dm.prepare_data()
    ident = identity(recipe, dm)
    folder = cache_folder(recipe, ident)
    G = t.micro_batch_size * t.grad_accum * world
    meta = _read_meta(folder)
    if meta is not None:
        if _difference(ident, meta.get("identity", {})) is None and meta["step_windows"] == G:
            if verbose:
                print(f"distill-cache: cached, {folder}", flush=True)
            return folder
        diff = _difference(ident, meta.get("identity", {})) or f"{meta['step_windows']} windows a step, not {G}"
        raise RecipeError(f"the teacher cache {folder} exists for other settings ({diff}); delete it or choose "
                          f"another train.distill.cache.")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fix = "set train.distill.cache or data.cache_dir to a writable folder with room"
    with writing("the teacher cache", folder, fix), _file_lock(folder.with_name(f".{folder.name}.lock")):
        if _read_meta(folder) is not None:  # another process finished it while this one waited
            return folder
        if folder.exists():  # not ours to guess about: a folder without meta.json is unfinished
            shutil.rmtree(folder)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            V = _write(recipe, dm, dev, G, tmp, progress)
            (tmp / META).write_text(json.dumps({"identity": ident, "step_windows": G, "vocab": V,
                                                "k": cfg.k, "kind": cfg.kind, "files": FILES}, indent=1))
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if verbose:
        print(f"distill-cache: {t.max_steps} steps x {G} windows x {t.seq_len} tokens -> {folder}", flush=True)
    return folder


def _write(recipe: Recipe, dm, dev: torch.device, G: int, out: Path, progress: Optional[bool]) -> int:
    """Fill the arrays; returns the vocabulary the targets cover."""
    from arch.distill import _cap, sparse_target
    from arch.documents import document_ids, document_positions
    from lit_modules.train.distill import _open

    cfg, t = recipe.train.distill, recipe.train
    steps, T, k = t.max_steps, t.seq_len, cfg.k
    teacher = _open(cfg.teacher)[2](dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    teacher.eval().requires_grad_(False)
    V = min(teacher.cfg.vocab_size, recipe.model.vocab_size)  # the ids both heads have (check_teacher)
    w_t, cap_t = teacher.head_weight(), teacher.cfg.final_softcap
    counts = cfg.kind == "sampled_counts"
    fm = np.lib.format.open_memmap
    tokens = fm(out / FILES["tokens"], mode="w+", dtype=np.int32, shape=(steps, G, T + 1))
    ids = fm(out / FILES["ids"], mode="w+", dtype=np.int32, shape=(steps, G, T, k))
    weights = fm(out / FILES["weights"], mode="w+", dtype=np.uint16 if counts else np.float16, shape=(steps, G, T, k))
    nll = fm(out / FILES["nll"], mode="w+", dtype=np.float32, shape=(steps, G, T))
    gen = torch.Generator(dev).manual_seed(t.seed)  # the draws, reproducible from the recipe
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=steps * G * T, desc="teacher targets", unit="tok", unit_scale=True, leave=False)
    mb = t.micro_batch_size
    with torch.no_grad():
        for s, batch in enumerate(dm.all_rank_batches(G, steps)):
            tokens[s] = batch.numpy()
            for r in range(0, G, mb):
                x, y = batch[r:r + mb, :-1].to(dev), batch[r:r + mb, 1:].to(dev)
                docs = {}
                if t.document_mask:  # the teacher sees the documents as the student will
                    doc = document_ids(x, dm.eos_id)
                    docs = {"doc_ids": doc, "positions": document_positions(doc) if t.document_positions else None}
                h = teacher(x, return_logits=False, return_hidden=True, **docs).hidden.flatten(0, 1)
                yf = y.flatten()
                out_ids, out_w, out_nll = [], [], []
                for c in range(0, h.shape[0], cfg.chunk):  # never the whole (tokens x vocab) logits
                    z = _cap((h[c:c + cfg.chunk].to(w_t.dtype) @ w_t.T).float(), cap_t)
                    i, w = sparse_target(z[:, :V], cfg.kind, k, cfg.temperature, gen)
                    if not counts:  # stored renormalised: float16 keeps small shares of a row
                        w = w / w.sum(-1, keepdim=True)
                    if i.shape[1] < k:  # topk past the vocabulary: empty slots (id 0, weight 0)
                        i, w = (torch.nn.functional.pad(a, (0, k - a.shape[1])) for a in (i, w))
                    out_ids.append(i)
                    out_w.append(w)
                    out_nll.append(torch.logsumexp(z, -1) - z.gather(1, yf[c:c + cfg.chunk, None]).squeeze(1))
                n = x.shape[0]
                ids[s, r:r + n] = torch.cat(out_ids).view(n, T, -1).cpu().numpy().astype(np.int32)
                wv = torch.cat(out_w).view(n, T, -1).cpu()
                weights[s, r:r + n] = (wv.round().numpy().astype(np.uint16) if counts
                                       else wv.numpy().astype(np.float16))
                nll[s, r:r + n] = torch.cat(out_nll).view(n, T).cpu().numpy()
                if bar is not None:
                    bar.update(n * T)
    if bar is not None:
        bar.close()
    for a in (tokens, ids, weights, nll):
        a.flush()
    return V


class CachedTeacher:
    """The teacher of offline mode: the cache's rows for this rank at each step, turned
    into the student's loss (arch/distill.cached_distill_loss)."""

    def __init__(self, folder: Path, cfg, student_softcap: Optional[float],
                 rank: int, world: int, rows: int, device: torch.device):
        meta = _read_meta(folder)
        if meta is None:
            raise RecipeError(f"train.distill.mode = offline: no complete teacher cache at {folder}; build it "
                              f"first with {BUILD}.")
        G = rows * world
        if meta["step_windows"] != G:
            raise RecipeError(f"the teacher cache {folder} holds {meta['step_windows']} windows a step, this run "
                              f"takes {G} ({rows} a rank x {world} rank(s)); build it with {BUILD} --world {world}.")
        paths = {n: _inside(folder, meta["files"][n]) for n in FILES}  # all checked before any is read
        self.arrays = {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
        self.cfg, self.student_softcap, self.vocab = cfg, student_softcap, int(meta["vocab"])
        self.rank, self.world, self.device = rank, world, device
        self.counts = meta["kind"] == "sampled_counts"
        self.checked = False
        self.rows: Dict[str, torch.Tensor] = {}

    def begin_step(self, step: int, batch: torch.Tensor) -> None:
        """This rank's rows of `step`; the first step of a process checks that they were
        made from the very tokens of its batch (a resumed run included)."""
        a = self.arrays
        if step >= a["ids"].shape[0]:
            raise RecipeError(f"the teacher cache holds {a['ids'].shape[0]} steps, the run reached step {step + 1}; "
                              f"build it for train.max_steps with {BUILD}.")
        sl = slice(self.rank, None, self.world)
        if not self.checked:
            want = torch.from_numpy(np.array(a["tokens"][step, sl])).to(batch.device, batch.dtype)
            if not torch.equal(want, batch):
                raise RecipeError(f"the teacher cache's tokens of step {step + 1} differ from the batch this rank "
                                  f"trains on (another data order or split); build the cache with {BUILD}.")
            self.checked = True
        w = torch.from_numpy(np.array(a["weights"][step, sl]).astype(np.float32))
        self.rows = {"ids": torch.from_numpy(np.array(a["ids"][step, sl])).to(self.device),
                     "weights": w.to(self.device),
                     "nll": torch.from_numpy(np.array(a["nll"][step, sl])).to(self.device)}

    def head_loss(self, x: torch.Tensor, y: torch.Tensor, documents: Optional[Dict] = None,
                  rows: slice = slice(None)) -> "CachedHeadLoss":
        """`rows`: the micro-batch's rows of this rank's batch."""
        r = {n: v[rows].flatten(0, 1) for n, v in self.rows.items()}
        return CachedHeadLoss(self, r, y.flatten())


class CachedHeadLoss:
    """head_loss(h_ND, w_VD) for the student's forward, as DistillHeadLoss."""

    def __init__(self, teacher: CachedTeacher, rows: Dict[str, torch.Tensor], y: torch.Tensor):
        self.teacher, self.r, self.y = teacher, rows, y
        self.parts: Dict[str, torch.Tensor] = {}

    def __call__(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from arch.distill import cached_distill_loss

        c, r = self.teacher.cfg, self.r
        out = cached_distill_loss(h, w, r["ids"], r["weights"], r["nll"], self.y, c.temperature, c.alpha,
                                  self.teacher.student_softcap, self.teacher.vocab, c.chunk)
        self.parts = {"ce_loss": out["ce"], "distill_loss": out["distill"], "teacher_ce_loss": out["teacher_ce"]}
        return out["loss"]
