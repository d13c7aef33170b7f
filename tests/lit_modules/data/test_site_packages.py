"""data.source: site-packages: every *.py of the installed packages, in the same
hash order, fingerprint and by-file validation split as the standard library."""
import os
from pathlib import Path

import pytest

from arch.config import DataConfig
from lit_modules.data import corpus as corpus_mod
from lit_modules.data.corpus import Corpus, name_hash, site_files, stdlib_files, stdlib_root


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A small site-packages: two packages, a cache folder, an editable-install finder,
    a file that is not UTF-8, a link to a file and a dangling link."""
    root = tmp_path / "site-packages"
    for rel, text in {"alpha/__init__.py": "A = 1\n", "alpha/core.py": "def f():\n    return 2\n" * 50,
                      "beta/mod.py": "# beta\nx = [i for i in range(3)]\n", "top.py": "print('top')\n",
                      "alpha/__pycache__/core.cpython-311.py": "cached\n", "alpha/data.txt": "not code\n",
                      "__editable___moelab_finder.py": "MAPPING = {'/home/someone': 1}\n",
                      "beta/empty.py": "   \n"}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "beta" / "latin.py").write_bytes(b"s = '\xe9t\xe9'\n")  # no coding cookie: not Python text
    os.symlink(root / "top.py", root / "beta" / "top_link.py")
    os.symlink(root / "missing.py", root / "beta" / "dangling.py")
    monkeypatch.setattr(corpus_mod, "site_roots", lambda: [root])
    return root


def test_listing_and_documents(fake_site):
    names = [rel for rel, _ in site_files()]
    assert names == ["alpha/__init__.py", "alpha/core.py", "beta/empty.py", "beta/latin.py", "beta/mod.py", "top.py"]
    c = Corpus(DataConfig(source="site-packages", val_fraction=0.5))
    docs = dict(c.documents())
    # blank and undecodable files left out, the rest verbatim under site-packages/
    assert set(docs) == {"site-packages/alpha/__init__.py", "site-packages/alpha/core.py",
                         "site-packages/beta/mod.py", "site-packages/top.py"}
    assert docs["site-packages/alpha/core.py"] == (fake_site / "alpha/core.py").read_text()
    order = [n for n, _ in c.documents()]
    assert order == sorted(order, key=lambda n: (name_hash("order/" + n), n))
    plan = c.plan()
    assert {plan.assign(n) for n in docs} == {"train", "val"}
    assert "installed packages" in c.describe()


def test_fingerprint_follows_the_files(fake_site):
    a = Corpus(DataConfig(source="site-packages")).key()
    assert Corpus(DataConfig(source="site-packages")).key() == a
    (fake_site / "gamma.py").write_text("g = 3\n")
    assert Corpus(DataConfig(source="site-packages")).key() != a
    assert Corpus(DataConfig(source="site-packages", max_chars=10)).key() != a


def test_no_packages_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "site_roots", lambda: [tmp_path])
    with pytest.raises(corpus_mod.DataError, match="has no installed package sources"):
        Corpus(DataConfig(source="site-packages"))


def test_real_site_packages_capped():
    """This Python's own packages, capped: the cap is exact, nothing comes from the
    standard library, and a document keeps its split whatever the cap."""
    cap = 150_000
    c = Corpus(DataConfig(source="site-packages", max_chars=cap, val_fraction=0.2))
    docs = list(c.documents())
    assert sum(len(t) for _, t in docs) == cap
    assert all(n.startswith("site-packages/") and n.endswith(".py") and "__pycache__" not in n for n, _ in docs)
    stdlib = {str(p) for _, p in stdlib_files()}
    assert not stdlib & {str(p) for _, p in c.sources[0].files}
    assert all(not Path(p).resolve().is_relative_to(stdlib_root().resolve())
               or "site-packages" in Path(p).parts or "dist-packages" in Path(p).parts
               for _, p in c.sources[0].files[:200])
    small = Corpus(DataConfig(source="site-packages", max_chars=cap // 3, val_fraction=0.2))
    plan_b, plan_s = c.plan(), small.plan()
    names_s = [n for n, _ in small.documents()]
    assert names_s == [n for n, _ in docs][:len(names_s)]  # the same order, cut earlier
    forced = {plan_b.forced_val, plan_b.forced_train, plan_s.forced_val, plan_s.forced_train}
    assert all(plan_b.assign(n) == plan_s.assign(n) for n in names_s if n not in forced)
