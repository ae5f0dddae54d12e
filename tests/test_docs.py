"""The reader's documents point at things that exist: every test a page names is defined, every
link between pages resolves, and no file points at documents outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_every_named_test_exists():
    named = {(page.name, f, t) for page in PAGES
             for f, t in re.findall(r"(tests/\w+\.py)::(\w+)", page.read_text(encoding="utf-8"))}
    assert len(named) > 30  # math.md alone names more than 30
    missing = [(page, f, t) for page, f, t in sorted(named)
               if not (ROOT / f).is_file() or f"def {t}(" not in (ROOT / f).read_text(encoding="utf-8")]
    assert not missing, missing


def test_links_between_pages_resolve():
    broken = [(page.name, target) for page in PAGES
              for target in re.findall(r"\]\(([\w./-]+)\)", page.read_text(encoding="utf-8"))
              if not target.startswith("http") and not (page.parent / target).exists()]
    assert not broken, broken


def test_no_pointers_to_documents_outside_the_repository():
    # written in pieces so that this file does not match itself
    pointer = re.compile("|".join([r"\bSP" + r"EC\b", "DES" + r"IGN\.md", r"[Ii]ss" + r"ue \d",
                                   r"\b[Hh]el" + r"per [A-Z]\b", "the le" + r"ad\b", "docs/no" + "tes/"]))
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*"), *ROOT.glob("*.py"),
             *(ROOT / "minidiff").glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files if f.is_file()
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if pointer.search(line)]
    assert not hits, "\n".join(hits)


def test_the_reading_order_names_every_module():
    """README's reading order names each module of the package (and each script) as it now stands."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    reading = readme[readme.index("## Reading order"):readme.index("| equation | code |")]
    modules = [p for p in (ROOT / "minidiff").rglob("*.py") if p.name != "__init__.py" and "lm_eval_tasks" not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in modules if f"`{p.name}`" not in reading]
    scripts = [p.name for p in ROOT.glob("*.py") if f"`{p.name}`" not in reading]
    assert not missing and not scripts, (missing, scripts)
