"""Text corpora for training: where the documents come from and how they split.

A corpus is an ordered stream of documents `(name, text)` named by `data.source`:

    "stdlib"            this Python's standard library (*.py, tests and generated
                        tables left out) plus the pydoc_data documentation topics
    "site-packages"     every *.py of this Python's installed packages (the
                        site-packages / purelib / platlib folders): hundreds of
                        millions of characters where torch and transformers are
                        installed, for GPU-sized runs without a download
    "notes/*.txt"       plain-text files (a glob, a file or a folder; .gz works)
    "dump.jsonl"        JSON Lines, one document per line under `data.text_field`
    "shards/*.parquet"  Parquet files, one document per row of the `data.text_field`
                        column (needs pyarrow: the `parquet` extra)
    "my_dataset/"       a folder written by Hugging Face `datasets`' save_to_disk
                        (a Dataset, or a DatasetDict: all its splits); its Arrow
                        files are read with pyarrow, without the datasets package
    [a, b, ...]         several of the above, in order

The order is fixed (sorted paths; for the standard library and site-packages a hash of
each path, so a `data.max_chars` cap samples the whole library instead of its first
letters), and
`data.max_chars` cuts the stream after that many characters. Documents go to the
validation split by a hash of their name (the relative path, `path:line` for JSONL),
so the split is the same on every machine and does not move when files are added.
Rows of Parquet and Arrow files are named `path:row` (row from 1), like JSONL lines.
"""
from __future__ import annotations

import codecs
import fnmatch
import functools
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from stat import S_ISREG
from typing import Iterator, List, Optional, Tuple

from arch.config import DataConfig
from arch.ranges import require_numbers
from arch.registry import RecipeError

CORPUS_VERSION = 1  # bump when the document stream for the same inputs changes

# Folders of the standard library that are not the library itself: test suites,
# installed packages, build configuration, and codec tables generated from Unicode
# mapping files (encodings/: ~4 MB of hex literals that would dominate a BPE).
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                    "__pycache__", "encodings"}
# pydoc_data/topics.py is added as its separate topics; _sysconfigdata_* holds this
# machine's build paths, which would make the corpus differ between machines.
STDLIB_SKIP_FILES = ("pydoc_data/topics.py",)
STDLIB_SKIP_PREFIXES = ("_sysconfigdata_",)
# a folder given as a source contributes these files (recursively)
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl", ".txt.gz", ".md.gz", ".jsonl.gz", ".parquet")
# column files read through pyarrow: Parquet, and the Arrow IPC streams of `datasets`
TABLE_SUFFIXES = (".parquet", ".arrow")
TABLE_ROWS = 1024  # rows read from a Parquet file at a time


class DataError(RecipeError):
    """Bad data input (paths, corpus, tokenizer); the message says what to change.

    A RecipeError, so `moelab` prints it as one line and exits 2."""


def name_hash(name: str) -> float:
    """A uniform number in [0, 1) from a document's name, the same on every machine."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _is_table(path: Path) -> bool:
    return path.name.endswith(TABLE_SUFFIXES)


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text(path: Path, encoding: str):
    """Strict decoding: a byte that does not decode raises, never becomes U+FFFD."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding)
    return open(path, "r", encoding=encoding)


# what a truncated or corrupt .gz raises (gzip.BadGzipFile is an OSError)
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _unreadable(path: Path, e: BaseException) -> DataError:
    """A read that failed, as one sentence naming the file."""
    if path.name.endswith(".gz") and isinstance(e, _GZIP_ERRORS):
        return DataError(f"{path} is not a readable gzip file ({str(e).splitlines()[0] or type(e).__name__}): it is "
                         f"truncated or corrupt; copy or compress it again, or remove it from data.source.")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return DataError(f"cannot read {path}: {reason}; check the file, or remove it from data.source.")


def _first_bad_byte(path: Path, encoding: str) -> int:
    """Byte offset (of the decompressed data, for .gz) where decoding fails: read again
    in pieces through an incremental decoder, on the error path only."""
    dec = codecs.getincrementaldecoder(encoding)("strict")
    pos = 0
    with _open_binary(path) as f:
        while True:
            piece = f.read(1 << 20)
            pending = len(dec.getstate()[0])  # bytes of an unfinished character, kept from before
            try:
                dec.decode(piece, final=not piece)
            except UnicodeDecodeError as e:
                return pos - pending + e.start
            if not piece:
                return pos
            pos += len(piece)


def _not_decodable(path: Path, encoding: str) -> DataError:
    """Why a file failed to decode: binary data (which seldom decodes: say so, rather
    than suggest another encoding), or the offset of the first byte that does not."""
    nul = _nul_byte(path, encoding)
    if nul is not None:
        return _binary(path, f"byte offset {nul:,}")
    off = _first_bad_byte(path, encoding)
    with _open_binary(path) as f:
        f.seek(off)
        byte = f.read(1)
    of = " of its decompressed data" if path.name.endswith(".gz") else ""
    alt = "latin-1" if codecs.lookup(encoding).name != "iso8859-1" else "utf-8"
    return DataError(f"{path} is not {encoding} text: the byte at offset {off:,}{of} (0x{byte.hex() or '??'}) "
                     f"does not decode; set data.encoding to the file's encoding (e.g. data.encoding={alt}) or "
                     f"convert the file to {encoding}.")


def _nul_byte(path: Path, encoding: str) -> Optional[int]:
    """Offset of the first NUL byte, if the encoding is ASCII-compatible (in UTF-16/32
    NUL bytes are ordinary) and there is one."""
    if "\0".encode(encoding) != b"\0":
        return None
    with _open_binary(path) as f:
        off = 0
        while piece := f.read(1 << 20):
            if b"\0" in piece:
                return off + piece.index(b"\0")
            off += len(piece)
    return None


def _binary(path: Path, where: str) -> DataError:
    return DataError(f"{path} holds NUL bytes (the first at {where}): it is binary, not text; remove it from "
                     f"data.source (or narrow the glob), or, for UTF-16/32 text, set data.encoding=utf-16 (or "
                     f"utf-32).")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A whole file as text (newlines made \\n, as Python's text mode does), or one
    DataError naming the file: binary (NUL bytes), not decodable under `encoding`
    (with the byte offset), a truncated or corrupt .gz, unreadable. The offsets are
    found by reading again, on the error path only."""
    try:
        with _open_text(path, encoding) as f:
            text = f.read()
    except UnicodeDecodeError:
        raise _not_decodable(path, encoding) from None
    except (OSError, *_GZIP_ERRORS) as e:
        raise _unreadable(path, e) from None
    if "\0" in text:
        nul = _nul_byte(path, encoding)
        raise _binary(path, f"byte offset {nul:,}" if nul is not None else f"character {text.index(chr(0)):,}")
    return text


def _python_source(path: Path) -> str:
    """A standard-library source file, decoded as Python decodes it: its coding cookie
    (PEP 263), else UTF-8. The embedded corpus must read on every Python version, so
    this never asks the user to pick an encoding."""
    import tokenize

    with open(path, "rb") as f:
        encoding, _ = tokenize.detect_encoding(f.readline)
    return read_text(path, encoding)


def _site_source(path: Path) -> Optional[str]:
    """An installed package's source, or None for one that is not Python text (a bad
    coding cookie, bytes that do not decode, NUL bytes): third-party files are outside
    the user's hands, so they are left out, the same ones on every read."""
    try:
        return _python_source(path)
    except (DataError, SyntaxError, LookupError, OSError):
        return None


def check_encoding(encoding) -> None:
    try:
        # b"" would not look the codec up; this also refuses codecs that are not text
        # encodings (base64, rot13)
        b"a".decode(encoding, errors="ignore")
    except (LookupError, TypeError):
        raise DataError(f"data.encoding = {encoding!r} is not a text encoding Python knows; use e.g. utf-8, "
                        f"latin-1, cp1252 or utf-16.") from None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> List[Tuple[str, Path]]:
    """(relative posix path, path) of the standard library's own sources, sorted."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for f in filenames:
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            if f.endswith(".py") and rel not in STDLIB_SKIP_FILES and not f.startswith(STDLIB_SKIP_PREFIXES):
                out.append((rel, Path(dirpath) / f))
    return sorted(out)


# site-packages files that are this machine's installation, not code: editable-install
# finders hold absolute paths, so the corpus would differ between machines
SITE_SKIP_PREFIXES = ("__editable__", "_virtualenv", "distutils-precedence")


def site_roots() -> List[Path]:
    """This Python's package folders (site-packages, purelib, platlib; the user's own
    when Python would read it), each once, in a fixed order."""
    import site

    folders = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    paths = sysconfig.get_paths()
    folders += [paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    out, seen = [], set()
    for f in folders:
        p = Path(f)
        if p.is_dir() and (real := p.resolve()) not in seen:
            seen.add(real)
            out.append(p)
    return out


def site_files() -> List[Tuple[str, Path]]:
    """(relative posix path, path) of every *.py under the package folders, sorted; a
    file reached twice (a link, nested folders) counts once, by its first name."""
    out, seen = [], set()
    for i, root in enumerate(site_roots()):
        # the first folder's names stay short; others get their index, so names never collide
        prefix = "" if i == 0 else f"{i}/"
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for f in filenames:
                if not f.endswith(".py") or f.startswith(SITE_SKIP_PREFIXES):
                    continue
                p = Path(dirpath) / f
                try:
                    st = os.stat(p)  # one stat: a file reached twice (a link) has one (device, inode)
                except OSError:  # a dangling link
                    continue
                if not S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                out.append((prefix + (f if rel_dir == "." else f"{rel_dir}/{f}"), p))
    return sorted(out)


def _topics() -> dict:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return topics


@dataclass(frozen=True)
class Source:
    """One entry of data.source, expanded to files."""

    spec: str  # as written in the recipe
    files: Tuple[Tuple[str, Path], ...]  # (document-name prefix, path)
    stdlib: bool = False
    site: bool = False  # site-packages: Python sources in hash order, like stdlib

    @property
    def builtin(self) -> bool:
        """A corpus of this Python's own files (named and ordered by moelab)."""
        return self.stdlib or self.site


def _match_name(pattern: str, name: str) -> bool:
    if not has_magic(pattern):
        return name == pattern
    # as glob: a wildcard does not match a leading dot
    return (not name.startswith(".") or pattern.startswith(".")) and fnmatch.fnmatchcase(name, pattern)


def _match_parts(pattern: Tuple[str, ...], names: Tuple[str, ...]) -> bool:
    """glob's rule for path components: `**` is zero or more folders (none hidden)."""

    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(names)
        if pattern[i] == "**":
            return match(i + 1, j) or (j < len(names) and not names[j].startswith(".") and match(i, j + 1))
        return j < len(names) and _match_name(pattern[i], names[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _glob(pattern: Path) -> List[Path]:
    """glob(pattern, recursive=True), except that a `**` walks each folder once (by
    device and inode): a symbolic link back up the tree neither hangs the walk (glob
    follows it until the path is too long, doubling per loop) nor yields its files again."""
    parts = pattern.parts
    if "**" not in parts:
        return [Path(p) for p in glob(str(pattern))]
    first = next(i for i, part in enumerate(parts) if has_magic(part))
    root, rest = Path(*parts[:first]), parts[first:]
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        rel = Path(folder).relative_to(root).parts
        found += [Path(folder) / f for f in files if _match_parts(rest, rel + (f,))]
    return found


def _expand(spec: str, where: str) -> List[Path]:
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute():
        path = Path.cwd() / path
    if has_magic(str(path)):
        found = [p for p in _glob(path) if p.is_file()]
    elif path.is_dir() and _is_datasets_dir(path):
        return _datasets_files(path, spec, where)
    elif path.is_dir():
        if next(path.rglob("*.arrow"), None) is not None and not any(path.rglob("*.parquet")):
            raise DataError(f"{where} '{spec}' holds .arrow files but is not a datasets directory (no state.json "
                            f"or dataset_dict.json in it); give the folder that Dataset.save_to_disk wrote, or "
                            f"name the .arrow files with a glob such as '{spec}/**/*.arrow'.")
        found = [p for p in path.rglob("*") if p.is_file() and p.name.endswith(FOLDER_SUFFIXES)]
        if not found:
            raise DataError(
                f"{where} '{spec}' is a folder with no {', '.join(FOLDER_SUFFIXES[:3])} files in it; "
                f"name the files with a glob such as '{spec}/**/*.log'."
            )
    elif path.is_file():
        found = [path]
    else:
        found = []
    if not found:
        raise DataError(
            f"{where} '{spec}' matches no file (relative paths are taken from {Path.cwd()}); "
            f"check the path or glob."
        )
    return sorted(set(found))


def _is_datasets_dir(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _inside(folder: Path, name, what: str) -> Path:
    """A file named in `what` (a JSON file of `folder`), refused unless it stays inside
    the folder: a crafted file must not make the corpus read elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise DataError(f"{what} names {name!r}, not a file name inside {folder}; save the dataset again with "
                        f"save_to_disk.")
    p = (folder / name).resolve()
    if not p.is_relative_to(folder.resolve()):
        raise DataError(f"{what} names {name!r}, which lies outside {folder}; save the dataset again with "
                        f"save_to_disk.")
    return folder / name


def _read_json(path: Path, spec: str, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{where} '{spec}': {path} is not readable JSON ({str(e).splitlines()[0]}); the folder is "
                        f"not a complete datasets directory: save it again with save_to_disk.") from None


def _datasets_files(folder: Path, spec: str, where: str, depth: int = 0) -> List[Path]:
    """The Arrow files of a save_to_disk folder, in the order `datasets` reads them: a
    Dataset's state.json lists its files; a DatasetDict's dataset_dict.json lists its
    splits, each a Dataset folder."""
    if (folder / "dataset_dict.json").is_file() and depth == 0:
        what = folder / "dataset_dict.json"
        splits = _read_json(what, spec, where)
        splits = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(splits, list) or not splits:
            raise DataError(f"{where} '{spec}': {what} lists no splits; save the DatasetDict again with "
                            f"save_to_disk.")
        out = []
        for split in splits:
            sub = _inside(folder, split, str(what))
            if not (sub / "state.json").is_file():
                raise DataError(f"{where} '{spec}': the split '{split}' has no {sub / 'state.json'}; save the "
                                f"DatasetDict again with save_to_disk.")
            out += _datasets_files(sub, spec, where, depth + 1)
        return out
    what = folder / "state.json"
    state = _read_json(what, spec, where)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise DataError(f"{where} '{spec}': {what} lists no data files (_data_files); save the dataset again "
                        f"with save_to_disk.")
    out = []
    for f in files:
        p = _inside(folder, f.get("filename") if isinstance(f, dict) else f, str(what))
        if not p.is_file():
            raise DataError(f"{where} '{spec}': {p}, listed in {what}, is missing; copy the whole dataset folder.")
        out.append(p)
    return out


def _pyarrow(path: Path):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed; pip install 'moelab[parquet]' "
                        f"(or pip install pyarrow).") from None
    return pyarrow


def _as_list(source) -> List[str]:
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        return [str(source)]
    return [str(s) for s in source]


class Corpus:
    """The documents that a DataConfig names, in a fixed order, capped at max_chars."""

    def __init__(self, cfg: DataConfig, where: str = "data.source"):
        """`where`: the recipe key that named the source, for messages (a mix's
        entries are data.mix[i].source)."""
        self.cfg, self.where = cfg, where
        specs = _as_list(cfg.source)
        if not specs:
            raise DataError(f"{where} is empty; set it to 'stdlib' or to paths/globs of .txt or .jsonl files.")
        require_numbers(cfg, "data", DataError)  # val_fraction, max_chars: load_recipe's rules
        check_encoding(cfg.encoding)
        self.sources: List[Source] = []
        user_files: List[Path] = []
        read = set()  # a file reached twice (two globs, a symbolic link) is read once, by its first name
        for i, spec in enumerate(specs):
            where_i = where if len(specs) == 1 else f"{where}[{i}]"
            if spec == "stdlib":
                files = tuple((f"stdlib/{rel}", p) for rel, p in stdlib_files())
                self.sources.append(Source(spec, files, stdlib=True))
            elif spec == "site-packages":
                files = tuple((f"site-packages/{rel}", p) for rel, p in site_files())
                if not files:
                    raise DataError(f"{where_i} 'site-packages': this Python ({sys.executable}) has no installed "
                                    f"package sources; use 'stdlib' or paths/globs of text files.")
                self.sources.append(Source(spec, files, site=True))
            else:
                found = []
                for p in _expand(spec, where_i):
                    if (real := p.resolve()) not in read:
                        read.add(real)
                        found.append(p)
                user_files += found
                self.sources.append(Source(spec, tuple(("", p) for p in found)))
                tables = [p for p in found if _is_table(p)]
                if tables:
                    _pyarrow(tables[0])  # before any work: the first such file is named
        # user files are named relative to their common folder, so the split does not
        # change when the data moves to another machine or folder
        if user_files:
            common = Path(os.path.commonpath([str(p.parent) for p in user_files]))
            self.sources = [
                s if s.builtin else Source(s.spec, tuple((p.relative_to(common).as_posix(), p) for _, p in s.files))
                for s in self.sources
            ]

    # ------------------------------------------------------------------ identity

    def describe(self) -> str:
        parts = []
        for s in self.sources:
            if s.stdlib:
                v = sys.version_info
                parts.append(f"the Python {v.major}.{v.minor}.{v.micro} standard library "
                             f"({len(s.files)} files + {len(_topics())} doc topics)")
            elif s.site:
                parts.append(f"the installed packages' Python sources ({len(s.files)} files under "
                             f"{', '.join(str(r) for r in site_roots())})")
            else:
                parts.append(f"{s.spec} ({len(s.files)} file{'s' * (len(s.files) != 1)})")
        cap = f", first {self.cfg.max_chars:,} chars" if self.cfg.max_chars else ""
        return " + ".join(parts) + cap

    def fingerprint(self) -> dict:
        """What the document stream depends on (JSON-able): files with their size and
        modification time, the Python for the standard library, the cap and split."""
        sources = []
        for s in self.sources:
            entry = {"spec": s.spec, "files": []}
            for name, p in s.files:
                st = p.stat()
                entry["files"].append([name or str(p), st.st_size, st.st_mtime_ns])
            if s.builtin:
                entry["python"] = sys.version
            if s.stdlib:
                topics_py = stdlib_root() / "pydoc_data" / "topics.py"
                entry["topics"] = [topics_py.stat().st_size, topics_py.stat().st_mtime_ns] if topics_py.exists() else None
            sources.append(entry)
        return {
            "version": CORPUS_VERSION, "sources": sources, "max_chars": self.cfg.max_chars,
            "val_fraction": float(self.cfg.val_fraction), "text_field": self.cfg.text_field,
            "encoding": self.cfg.encoding,
        }

    def key(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ----------------------------------------------------------------- documents

    def _raw_documents(self) -> Iterator[Tuple[str, str]]:
        for s in self.sources:
            if s.stdlib:
                docs = [(name, p) for name, p in s.files]
                docs += [(f"pydoc_data.topics/{k}", k) for k in sorted(_topics())]
                # hash order: a capped corpus is a sample of the whole library. The
                # order hash is salted: ordered by the split hash itself, the first
                # documents of a capped stream would all be validation ones.
                docs.sort(key=lambda d: (name_hash("order/" + d[0]), d[0]))
                topics = _topics()
                for name, what in docs:
                    # Python sources: their own encoding (PEP 263), whatever data.encoding says
                    yield name, _python_source(what) if isinstance(what, Path) else topics[what]
                continue
            if s.site:
                # the same salted hash order as stdlib: a capped corpus samples every package
                for name, p in sorted(s.files, key=lambda d: (name_hash("order/" + d[0]), d[0])):
                    text = _site_source(p)
                    if text is not None:
                        yield name, text
                continue
            for name, p in s.files:
                if _is_table(p):
                    yield from self._table(name, p)
                elif _is_jsonl(p):
                    yield from self._jsonl(name, p)
                else:
                    yield name, read_text(p, self.cfg.encoding)

    def _table(self, name: str, path: Path) -> Iterator[Tuple[str, str]]:
        """The rows of a Parquet file or an Arrow stream (a `datasets` shard), column
        data.text_field, read a record batch at a time; null rows are skipped."""
        pa = _pyarrow(path)
        field = self.cfg.text_field
        try:
            if path.name.endswith(".parquet"):
                pf = pa.parquet.ParquetFile(path)
                schema = pf.schema_arrow
                batches = None if field not in schema.names else pf.iter_batches(batch_size=TABLE_ROWS, columns=[field])
            else:
                reader = pa.ipc.open_stream(pa.memory_map(str(path)))
                schema, batches = reader.schema, reader
            if field not in schema.names:
                raise DataError(f"{path} has no column '{field}' (it has: {', '.join(schema.names)}); set "
                                f"data.text_field to the column that holds the text.")
            kind = schema.field(field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"{path} column '{field}' holds {kind}, not strings; point data.text_field at "
                                f"the text column.")
            row = 0
            for batch in batches:
                for text in batch.column(batch.schema.get_field_index(field)).to_pylist():
                    row += 1
                    if text is not None:
                        yield f"{name}:{row}", text
        except DataError:
            raise
        except (OSError, pa.ArrowException) as e:
            kind = "Parquet" if path.name.endswith(".parquet") else "Arrow stream (datasets)"
            raise DataError(f"{path} is not a readable {kind} file ({str(e).splitlines()[0] or type(e).__name__}); "
                            f"check the file, or remove it from data.source.") from None

    def _jsonl(self, name: str, path: Path) -> Iterator[Tuple[str, str]]:
        """The documents of a JSON Lines file, read line by line (one DataError for a
        file that is binary, does not decode, or is a truncated .gz)."""
        encoding = self.cfg.encoding
        try:
            with _open_text(path, encoding) as f:
                yield from self._jsonl_lines(name, path, f)
        except UnicodeDecodeError:
            raise _not_decodable(path, encoding) from None
        except (OSError, *_GZIP_ERRORS) as e:
            raise _unreadable(path, e) from None

    def _jsonl_lines(self, name: str, path: Path, f) -> Iterator[Tuple[str, str]]:
        field = self.cfg.text_field
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if "\0" in line:
                nul = _nul_byte(path, self.cfg.encoding)
                raise _binary(path, f"byte offset {nul:,}" if nul is not None else f"line {lineno}")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); "
                                f"each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{lineno} has no '{field}' field (it has: {keys}); "
                                f"set data.text_field to the key that holds the text.")
            text = obj[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno} field '{field}' is a {type(text).__name__}, "
                                f"not a string; point data.text_field at the text.")
            yield f"{name}:{lineno}", text

    def documents(self) -> Iterator[Tuple[str, str]]:
        """Non-blank documents in corpus order; the stream stops at max_chars (the last
        document cut to fit)."""
        left = self.cfg.max_chars
        for name, text in self._raw_documents():
            if not text.strip():
                continue
            if left is not None:
                text = text[:left]
                left -= len(text)
            yield name, text
            if left is not None and left <= 0:
                return

    def plan(self, progress=None) -> "SplitPlan":
        """One pass over the corpus: counts and the train/validation assignment. Raises
        DataError for an empty corpus, before anything is tokenized."""
        f = float(self.cfg.val_fraction)
        n = chars = n_val = val_chars = 0
        lo = hi = None  # (hash, name, chars) of the documents nearest each end of [0, 1)
        first_val_chars = 0  # the validation share of a lone document
        for name, text in self.documents():
            u = name_hash(name)
            n += 1
            chars += len(text)
            if u < f:
                n_val += 1
                val_chars += len(text)
            lo = min(lo, (u, name, len(text))) if lo else (u, name, len(text))
            hi = max(hi, (u, name, len(text))) if hi else (u, name, len(text))
            if n == 1 and f > 0:
                first_val_chars = len(text) - single_cut(text, f)
            if progress is not None:
                progress(len(text))
        if n == 0:
            specs = ", ".join(s.spec for s in self.sources)
            raise DataError(f"the corpus is empty: {self.where} ({specs}) holds no text; "
                            f"point it at files with text in them.")
        forced_val = forced_train = None
        if n == 1:
            val_chars = first_val_chars
        elif f > 0:
            # every split needs at least one document, whatever the fraction
            if n_val == 0:
                forced_val, val_chars = lo[1], lo[2]
            elif n_val == n:
                forced_train, val_chars = hi[1], val_chars - hi[2]
        return SplitPlan(f, n, chars, val_chars, single=(n == 1 and f > 0),
                         forced_val=forced_val, forced_train=forced_train)

    def split(self, plan: "SplitPlan", which: str) -> Iterator[str]:
        """The texts of one split ('train' or 'val'), in corpus order."""
        assert which in ("train", "val")
        for name, text in self.documents():
            if plan.single:
                cut = single_cut(text, plan.val_fraction)
                part = text[:cut] if which == "train" else text[cut:]
                if part.strip():
                    yield part
            elif plan.assign(name) == which:
                yield text


@dataclass(frozen=True)
class SplitPlan:
    """Which documents are validation: those whose name hashes below val_fraction,
    at least one and never all. A corpus of one document is cut at a line boundary."""

    val_fraction: float
    n_docs: int
    chars: int
    val_chars: int
    single: bool = False
    forced_val: Optional[str] = None
    forced_train: Optional[str] = None

    @property
    def train_chars(self) -> int:
        return self.chars - self.val_chars

    def assign(self, name: str) -> str:
        if name == self.forced_val:
            return "val"
        if name == self.forced_train:
            return "train"
        return "val" if name_hash(name) < self.val_fraction else "train"


def single_cut(text: str, val_fraction: float) -> int:
    """Where a lone document splits: the line start nearest before the
    (1 - val_fraction) point, so both parts are whole lines."""
    target = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, target)
    cut = nl + 1 if nl > 0 else target
    return max(1, min(cut, len(text) - 1))


def chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of at most ~size characters, cut after a newline where there is one, so
    a huge document is encoded piece by piece in bounded memory."""
    start = 0
    while len(text) - start > size:
        end = text.rfind("\n", start + size // 2, start + size)
        end = end + 1 if end > 0 else start + size
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]
