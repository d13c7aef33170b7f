"""The teacher of `train.distill`: checked against the student before any work, loaded
frozen beside it, and turned into the student's loss (arch/distill.py).

    check_distill_config   kind / mode, with the recipe's other checks (run.check_train)
    check_teacher          the teacher can be read and shares the student's tokenizer
                           (run.train, once the student's tokenizer is known)
    Teacher.load           eval mode, no gradients, bf16 on a GPU (CausalLM.configure_model)
    Teacher.head_loss      a `head_loss` for Transformer.forward: the teacher's final
                           hidden states for the micro-batch, then the fused loss
    offline mode           lit_modules/train/distill_cache.py (the same interface)

The teacher is no submodule of the LightningModule: it is never in a checkpoint, the
optimizer, DDP's buckets or FSDP's shards; every rank holds a whole copy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from tokenizers import Tokenizer

from arch.config import DistillConfig, Recipe
from arch.distill import KINDS, fused_distill_loss
from arch.registry import RecipeError, check_choice

MODES = ("online", "offline")


def check_distill_config(cfg: DistillConfig) -> None:
    """The string fields; numbers are arch/ranges.py's."""
    if cfg.teacher is None:
        return
    check_choice("train.distill.kind", cfg.kind, KINDS, "a distillation kind")
    check_choice("train.distill.mode", cfg.mode, MODES, "a mode")


def _open(source: str) -> Tuple[Recipe, Optional[Path], Callable]:
    """(teacher recipe, its tokenizer.json or None, load(device, dtype) -> model) for
    any source `moelab eval` takes; only the recipe is read here."""
    from lit_modules.checkpoints.hf import is_hf_dir, load_hf, recipe_from_hf
    from lit_modules.checkpoints.layout import TOKENIZER_FILE
    from lit_modules.checkpoints.model_dir import load_model

    path = Path(source).expanduser()
    if not path.exists():
        raise RecipeError(f"train.distill.teacher = {source}: no such file or directory; give a moelab model "
                          f"directory, run directory, .ckpt, .dcp folder or Hugging Face directory.")
    if is_hf_dir(path):
        recipe = recipe_from_hf(path)[1]
        tok = path / TOKENIZER_FILE
        return recipe, tok if tok.is_file() else None, lambda device, dtype: load_hf(path, device, dtype)[1]
    from lit_modules.checkpoints.model_dir import open_checkpoint

    recipe, _, tok = open_checkpoint(path)
    return recipe, tok, lambda device, dtype: load_model(path, device, dtype)[1]


def vocab_difference(student: Tokenizer, teacher: Tokenizer) -> Optional[str]:
    """None when both map every token to the same id, else what differs, briefly."""
    vs, vt = student.get_vocab(with_added_tokens=True), teacher.get_vocab(with_added_tokens=True)
    if vs == vt:
        return None
    moved = sorted((i, t) for t, i in vs.items() if vt.get(t) != i)
    extra = sorted((i, t) for t, i in vt.items() if t not in vs)
    if moved:
        i, t = moved[0]
        there = f"id {vt[t]}" if t in vt else "absent"
        example = f"the student's token {t!r} (id {i}) is {there} in the teacher's"
    else:
        i, t = extra[0]
        example = f"the teacher's token {t!r} (id {i}) is absent from the student's"
    return (f"{len(vs):,} vs {len(vt):,} tokens, {len(moved) + len(extra):,} differing; {example}")


def check_teacher(recipe: Recipe, student_tok: Tokenizer) -> None:
    """One sentence if train.distill.teacher cannot serve this student."""
    cfg, t = recipe.train.distill, recipe.train
    where = f"train.distill.teacher = {cfg.teacher}"
    try:
        t_recipe, tok_path, _ = _open(cfg.teacher)
    except RecipeError as e:
        msg = str(e)
        raise RecipeError(msg if msg.startswith("train.distill.teacher") else f"{where}: {msg}") from None
    if tok_path is None:
        raise RecipeError(f"{where} has no tokenizer.json beside it, so its token ids cannot be checked against "
                          f"the student's; copy the tokenizer it was trained with into that folder.")
    try:
        teacher_tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # the tokenizers error is a one-line serde message
        raise RecipeError(f"{where}: its tokenizer {tok_path} cannot be read ({str(e).splitlines()[0]}); "
                          f"replace it with the tokenizer.json the teacher was trained with.") from None
    diff = vocab_difference(student_tok, teacher_tok)
    if diff is not None:
        raise RecipeError(f"{where} uses another tokenizer than the student ({diff}); distillation compares the "
                          f"two distributions id by id, so train the student with the teacher's tokenizer "
                          f"(data.tokenizer={tok_path}).")
    from lit_modules.data.tokenizer import vocab_size

    need = vocab_size(student_tok)
    if t_recipe.model.vocab_size < need:
        raise RecipeError(f"{where} has model.vocab_size {t_recipe.model.vocab_size:,}, fewer than the "
                          f"tokenizer's {need:,} tokens; it was not trained with this tokenizer.")
    if t_recipe.model.max_seq_len < t.seq_len:
        raise RecipeError(f"{where} has model.max_seq_len {t_recipe.model.max_seq_len}, shorter than "
                          f"train.seq_len = {t.seq_len}; lower train.seq_len.")


class Teacher:
    """A frozen model whose next-token distributions the student learns."""

    def __init__(self, model: torch.nn.Module, cfg: DistillConfig, student_softcap: Optional[float],
                 student_vocab: int):
        self.model, self.cfg, self.student_softcap = model, cfg, student_softcap
        v_t = model.cfg.vocab_size
        # heads padded to different sizes: the distributions over the ids both have
        # (the tokenizer's, checked by check_teacher)
        self.vocab = None if v_t == student_vocab else min(v_t, student_vocab)

    @classmethod
    def load(cls, cfg: DistillConfig, device: torch.device, student_softcap: Optional[float],
             student_vocab: int) -> "Teacher":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = _open(cfg.teacher)[2](device, dtype)
        model.eval().requires_grad_(False)
        return cls(model, cfg, student_softcap, student_vocab)

    def begin_step(self, step: int, batch: torch.Tensor) -> None:
        """Nothing to read ahead online (the offline teacher reads the step's rows)."""

    def head_loss(self, x: torch.Tensor, y: torch.Tensor, documents: Optional[Dict] = None,
                  rows: slice = slice(None)) -> "DistillHeadLoss":
        """`documents`: the student's document arguments (train.document_mask), so the
        teacher sees the documents as the student does."""
        with torch.no_grad():
            h_t = self.model(x, return_logits=False, return_hidden=True, **(documents or {})).hidden
        return DistillHeadLoss(self, h_t.flatten(0, 1), y.flatten())


class DistillHeadLoss:
    """head_loss(h_ND, w_VD) for the student's forward; after the call, `parts` holds
    the detached losses to log (ce_loss: the student's next-token loss)."""

    def __init__(self, teacher: Teacher, h_t: torch.Tensor, y: torch.Tensor):
        self.teacher, self.h_t, self.y = teacher, h_t, y
        self.parts: Dict[str, torch.Tensor] = {}

    def __call__(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t, c = self.teacher, self.teacher.cfg
        out = fused_distill_loss(h, w, self.h_t, t.model.head_weight(), self.y, c.kind, c.k, c.temperature,
                                 c.alpha, self.teacher.student_softcap, t.model.cfg.final_softcap, t.vocab,
                                 c.chunk)
        self.parts = {"ce_loss": out["ce"], "distill_loss": out["distill"], "teacher_ce_loss": out["teacher_ce"]}
        return out["loss"]
