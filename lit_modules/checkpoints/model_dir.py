"""moelab model directories and the checkpoints they are read from.

A moelab model directory:

    recipe.yaml                      the resolved recipe (arch.recipe_to_yaml)
    model.safetensors                the model's state_dict, or, past one shard:
    model-00001-of-0000N.safetensors + model.safetensors.index.json (Hugging Face's
                                     index format: {"metadata": {...}, "weight_map": {...}})
    tokenizer.json                   optional

Everything that reads a model accepts four sources (`open_checkpoint`): such a
directory, a Lightning training checkpoint (.ckpt: the recipe YAML under
"moelab_recipe", weights under "state_dict" prefixed "model."), a sharded training
checkpoint folder (.dcp, lit_modules.checkpoints.sharded: consolidated here, on one
process, whatever layout wrote it), or a run directory (its newest checkpoint, either
form). Reading streams: the model is built on the meta device and each tensor is
placed as it is read, so loading needs the model's size once.
Writing goes to a sibling ".partial" directory renamed into place at the end, so an
interrupted write never leaves a half-written model directory behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from arch import build_model, load_recipe, recipe_to_yaml
from arch.config import Recipe
from arch.recipe import resolve_recipe

from lit_modules.checkpoints import layout
from lit_modules.checkpoints.layout import RECIPE_FILE, TOKENIZER_FILE, CheckpointError
from lit_modules.checkpoints.safe import inside, load_torch_file
from lit_modules.disk import check_folder, writing

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
OUT_FIX = "free space there, or choose another OUT_DIR"


# ------------------------------------------------------------------ tensor sources


class TensorSource:
    """Names and shapes up front (no data read), then tensors one at a time."""

    def __init__(self, shapes: Callable[[], Dict[str, tuple]], tensors: Callable[[], Iterator]):
        self._shapes, self._tensors = shapes, tensors

    def shapes(self) -> Dict[str, tuple]:
        return self._shapes()

    def tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return self._tensors()


def safetensors_files(folder) -> List[Path]:
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a safetensors index (JSON with a \"weight_map\" of tensor "
                                  f"names to shard files); repair or remove it.") from None
        files = [inside(folder, f, index) for f in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} shard(s) that are not in {folder} "
                                  f"({', '.join(missing[:3])}); the download or copy is incomplete.")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _safe_open(path: Path):
    """safe_open, with a truncated or foreign file refused in one sentence naming it."""
    from safetensors import safe_open

    try:
        h = safe_open(str(path), "pt")
    except Exception as e:  # SafetensorError (bad header, file shorter than it says), OSError
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); it is "
                              f"truncated or corrupt: download or copy it again.") from None
    with h:
        yield h


def safetensors_source(folder) -> TensorSource:
    """Tensors of a folder's safetensors shards, read with safe_open one at a time."""
    files = safetensors_files(folder)
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors file; it is not a saved model.")

    def shapes():
        out = {}
        for f in files:
            with _safe_open(f) as h:
                for k in h.keys():
                    out[k] = tuple(h.get_slice(k).get_shape())
        return out

    def tensors():
        for f in files:
            with _safe_open(f) as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)

    return TensorSource(shapes, tensors)


def dict_source(state: Dict[str, torch.Tensor]) -> TensorSource:
    return TensorSource(lambda: {k: tuple(v.shape) for k, v in state.items()}, lambda: iter(state.items()))


# -------------------------------------------------------------------- reading


def recipe_from_yaml(text: str, source: str) -> Recipe:
    """A resolved recipe stored as a YAML string (inside a Lightning checkpoint)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(text))
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise CheckpointError(f"{source}: the stored recipe does not fit this moelab's schema: "
                              f"{str(e).splitlines()[0]}") from None
    return resolve_recipe(recipe)


def _strip(key: str) -> Optional[str]:
    if not key.startswith("model."):
        return None  # the LightningModule's other state (metrics, losses)
    key = key[len("model."):]
    return key.replace("_orig_mod.", "")  # torch.compile's wrapper


def run_checkpoint(run_dir: Path) -> Path:
    found = layout.last_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"run directory {run_dir} has no {layout.CHECKPOINT_DIR}/{layout.LAST_CHECKPOINT} "
                              f"or {layout.LAST_SHARDED} (nor any step checkpoint); train until a checkpoint is "
                              f"written, or give the checkpoint's path.")
    return found


def sharded_source(path: Path) -> Tuple[Recipe, TensorSource]:
    """The recipe and the whole weights of a sharded training checkpoint folder."""
    from lit_modules.checkpoints.sharded import read_header, read_tensors, tensor_shapes

    recipe = recipe_from_yaml(read_header(path)["moelab_recipe"], str(path))
    src = TensorSource(lambda: {k2: v for k, v in tensor_shapes(path).items() if (k2 := _strip(k)) is not None},
                       lambda: ((k2, t) for k, t in read_tensors(path) if (k2 := _strip(k)) is not None))
    return recipe, src


def open_checkpoint(path) -> Tuple[Recipe, TensorSource, Optional[Path]]:
    """(recipe, tensor source, tokenizer.json or None) for a model directory, a
    Lightning .ckpt, a sharded checkpoint folder or a run directory."""
    path = Path(path)
    run_dir = None
    if path.is_dir() and layout.is_run_dir(path):  # a run directory (it has a recipe.yaml too)
        run_dir, path = path, run_checkpoint(path)
    elif layout.looks_sharded(path):
        pass  # below, with the sharded checkpoints of run directories
    elif path.is_dir() and (path / RECIPE_FILE).is_file():
        tok = path / TOKENIZER_FILE
        return load_recipe(path / RECIPE_FILE), safetensors_source(path), tok if tok.is_file() else None
    if path.is_file() and path.suffix == ".ckpt":
        ckpt = load_torch_file(path)
        if not isinstance(ckpt, dict) or "moelab_recipe" not in ckpt or "state_dict" not in ckpt:
            raise CheckpointError(f"{path} has no moelab_recipe/state_dict entries; it was not written by "
                                  "`moelab train`.")
        recipe = recipe_from_yaml(ckpt["moelab_recipe"], str(path))
        state = {k2: v for k, v in ckpt["state_dict"].items() if (k2 := _strip(k)) is not None}
        tok = _find_tokenizer([run_dir, path.parent, path.parent.parent])
        return recipe, dict_source(state), tok
    if layout.looks_sharded(path):
        recipe, src = sharded_source(path)
        return recipe, src, _find_tokenizer([run_dir, path.parent, path.parent.parent])
    if path.is_dir() and (path / "config.json").is_file():
        raise CheckpointError(f"{path} is a Hugging Face directory, not a moelab checkpoint; "
                              f"run `moelab import-hf {path} OUT_DIR` first.")
    raise CheckpointError(f"{path} is not a moelab checkpoint: give a model directory (with {RECIPE_FILE}), "
                          "a .ckpt file, a sharded checkpoint folder (.dcp) or a run directory (with checkpoints/).")


def _find_tokenizer(folders) -> Optional[Path]:
    """The tokenizer.json beside a checkpoint. The stored recipe's data.tokenizer is
    not followed: a path read from someone else's file may point anywhere."""
    for folder in folders:
        if folder is not None and (Path(folder) / TOKENIZER_FILE).is_file():
            return Path(folder) / TOKENIZER_FILE
    return None


def check_tensors(recipe: Recipe, shapes: Dict[str, tuple], source) -> None:
    """One sentence if the stored tensors are not exactly the recipe's model's."""
    meta = build_model(recipe.model, device="meta").state_dict()
    missing = [k for k in meta if k not in shapes]
    unexpected = [k for k in shapes if k not in meta]
    wrong = [f"{k} {tuple(shapes[k])} vs {tuple(meta[k].shape)}" for k in meta
             if k in shapes and tuple(shapes[k]) != tuple(meta[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected),
                             ("with another shape (stored vs recipe)", wrong)):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        raise CheckpointError(f"the tensors in {source} do not match the architecture of its recipe "
                              f"({'; '.join(parts)}); it was saved from another model, or the recipe was edited.")


def load_into(model: nn.Module, stream: Iterable[Tuple[str, torch.Tensor]], device="cpu",
              dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fill a meta-built model from a stream of complete tensors, each moved to `device`
    (and floating ones cast to `dtype`) as it arrives, so the host holds one at a time."""
    state = {}
    for name, t in stream:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"after loading, {len(left)} tensors were never given a value ({', '.join(left[:3])}).")
    return model


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None):
    """(recipe, model in eval mode, tokenizer.json or None) from a model directory, a
    .ckpt or a run directory."""
    recipe, src, tok = open_checkpoint(path)
    check_tensors(recipe, src.shapes(), path)
    model = build_model(recipe.model, device="meta")
    load_into(model, src.tensors(), device, dtype)
    return recipe, model.eval(), tok


def load_model_dir(path, device="cpu", dtype: Optional[torch.dtype] = None):
    """(recipe, model in eval mode) from a model directory, a .ckpt or a run directory."""
    recipe, model, _ = load_model(path, device, dtype)
    return recipe, model


# -------------------------------------------------------------------- writing


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_bytes`, straight to
    disk as they arrive: nothing is buffered, so writing a model costs one tensor of
    memory (safetensors' own save_file serialises a whole shard in memory first).

    Each shard's tensor bytes go to a scratch file; when the shard is full its header is
    written and the bytes are copied behind it. `close` names the shards as Hugging
    Face does (one: model.safetensors; more: model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json)."""

    def __init__(self, folder, max_shard_bytes: Optional[int] = None, prefix: str = "model"):
        self.folder = Path(folder)
        self.max_bytes = max_shard_bytes or DEFAULT_SHARD_BYTES
        self.prefix = prefix
        self.shards: List[Tuple[Path, List[str]]] = []
        self.total = 0
        self.seen = set()
        self._data = None  # scratch file of the open shard
        self._entries: Dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise CheckpointError(f"tensor {name} was written twice.")
        self.seen.add(name)
        t = tensor.detach()
        if hasattr(t, "full_tensor"):  # a DTensor from a sharded model
            t = t.full_tensor()
        t = t.cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store.")
        size = t.numel() * t.element_size()
        if self._data is not None and self._offset and self._offset + size > self.max_bytes:
            self._close_shard()
        if self._data is None:
            self._data = open(self.folder / f".{self.prefix}-{len(self.shards):05d}.data", "wb")
        if size:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self.total += size

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep the tensor bytes 8-byte aligned
        data_path = Path(self._data.name)
        self._data.close()
        path = self.folder / f".{self.prefix}-part-{len(self.shards):05d}.safetensors"
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 64 * 1024**2)
        data_path.unlink()
        self.shards.append((path, list(self._entries)))
        self._data, self._entries, self._offset = None, {}, 0

    def close(self) -> List[str]:
        if self._data is not None or not self.shards:
            if self._data is None:  # a model without tensors still gets its (empty) file
                self._data = open(self.folder / f".{self.prefix}-{len(self.shards):05d}.data", "wb")
            self._close_shard()
        n = len(self.shards)
        if n == 1:
            final = self.folder / f"{self.prefix}.safetensors"
            self.shards[0][0].rename(final)
            return [final.name]
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.shards):
            final = self.folder / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            names.append(final.name)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def partial_dir(out_dir) -> Path:
    """A fresh sibling directory to write into; refuses a non-empty OUT_DIR, one below
    a file, or one that cannot be written, in one sentence."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory; choose a new output "
                              "directory or remove it.")
    check_folder(out, "OUT_DIR", "choose another OUT_DIR")
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    with writing("OUT_DIR", out, OUT_FIX):
        out.parent.mkdir(parents=True, exist_ok=True)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    return work


@contextlib.contextmanager
def writing_dir(out_dir):
    """with writing_dir(OUT_DIR) as work: ... finish_dir(work, OUT_DIR, ...) — the
    partial directory to write into; on any failure it is removed (nothing half-written
    is left) and a failed write (disk full, read-only) is one sentence naming OUT_DIR."""
    work = partial_dir(out_dir)
    try:
        with writing("OUT_DIR", out_dir, OUT_FIX):
            yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def finish_dir(work: Path, out_dir, recipe: Optional[Recipe], tokenizer_path=None) -> None:
    """Write the recipe and tokenizer into `work`, then move it to `out_dir` in one rename."""
    if recipe is not None:
        (work / RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, work / TOKENIZER_FILE)
    out = Path(out_dir)
    if out.is_dir():
        out.rmdir()  # empty, checked by partial_dir
    work.rename(out)


def save_model_dir(model: nn.Module, recipe: Recipe, out_dir, tokenizer_path=None,
                   max_shard_bytes: Optional[int] = None) -> List[str]:
    """Write `model` (its state_dict) and its resolved recipe as a moelab model directory."""
    with writing_dir(out_dir) as work:
        writer = ShardWriter(work, max_shard_bytes)
        for name, t in model.state_dict().items():
            writer.add(name, t)
        files = writer.close()
        finish_dir(work, out_dir, recipe, tokenizer_path)
    return files


def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers of torch.compile and activation checkpointing."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


@torch.no_grad()
def load_weights(model: nn.Module, path) -> int:
    """Copy the weights of the checkpoint at `path` into an already materialised
    `model` (train.init_from): each tensor cast to its parameter's dtype and device as
    it is read. Every parameter and persistent buffer must be given, and nothing else.
    Returns the number of tensors copied."""
    _, src, _ = open_checkpoint(path)
    targets = {_plain_name(n): t for n, t in model.state_dict(keep_vars=True).items()}
    done = set()
    for name, t in src.tensors():
        if name not in targets:
            raise CheckpointError(f"{path} holds {name}, which the model does not have; it was saved from "
                                  f"another architecture.")
        targets[name].copy_(t)
        done.add(name)
    missing = [n for n in targets if n not in done]
    if missing:
        raise CheckpointError(f"{path} gives no value for {len(missing)} tensors of the model "
                              f"({', '.join(missing[:3])}); it was saved from another architecture.")
    return len(done)
