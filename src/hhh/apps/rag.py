"""Retrieval-augmented generation over your own files, with citations.

    index   text, markdown and PDF files -> chunks (split at headings, then at paragraphs, with overlap) ->
            all-MiniLM-L6-v2 embeddings (offline) -> a FAISS inner-product index on disk, with the chunk texts,
            their file and section, and each file's SHA-256 (re-indexing embeds only new and changed files,
            and drops the chunks of files that are gone)
    search  the question's embedding against the index: top k by cosine similarity, optionally re-ranked by
            maximal marginal relevance (MMR: relevant, and not a copy of what is already picked)
    ask     the model reads the numbered sources and the question, and answers citing [n]; when the best match is
            below the threshold nothing relevant was found and the answer is "I don't know" (the model is not
            asked)

The index folder holds `index.faiss`, `chunks.jsonl` and `manifest.json`.

>>> idx = Index.build(["docs/", "README.md"], "rag-index")                       # doctest: +SKIP
>>> ask(build_critic("bundled:smollm2-135m-instruct"), idx, "How does hhh resume a PPO run?").text   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".pdf"}
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
MIN_SCORE = 0.3   # cosine similarity below which nothing counts as relevant (set before measuring; README)
I_DONT_KNOW = "I don't know"


@dataclass(frozen=True)
class Chunk:
    source: str       # the file, as it was given (relative paths stay relative)
    section: str      # the heading it is under ("Top" before the first heading; "page N" in a PDF)
    text: str
    line: int         # first line in the file (PDF: 0)

    @property
    def citation(self) -> str:
        return f"{self.source} § {self.section}"


# ---------------------------------------------------------------------------------------------------- chunking

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def sections(markdown: str) -> list[tuple[str, int, str]]:
    """(heading, first line, body) for each section of a markdown text; headings inside code fences are code."""
    out: list[tuple[str, int, str]] = []
    title, start, body = "Top", 1, list[str]()
    fenced = False
    for n, line in enumerate(markdown.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            if any(b.strip() for b in body):
                out.append((title, start, "\n".join(body).strip("\n")))
            title, start, body = heading.group(2).strip(), n, []
        else:
            body.append(line)
    if any(b.strip() for b in body):
        out.append((title, start, "\n".join(body).strip("\n")))
    return out


def windows(text: str, *, size: int, overlap: int) -> list[str]:
    """`text` in pieces of at most `size` characters, cut between paragraphs where it can (else between
    lines, else anywhere), each piece starting with the last `overlap` characters of the one before."""
    limit = size - overlap - 2  # a unit fits in a piece after the overlap and the paragraph break
    if limit < 1:
        raise ValueError(f"chunk size {size} must be larger than the overlap {overlap} + 2")
    units: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        if len(para) <= limit:
            units.append(para)
            continue
        for line in para.splitlines():
            units += [line[i:i + limit] for i in range(0, len(line), limit)] if len(line) > limit else [line]
    pieces: list[str] = []
    current = ""
    for unit in units:
        if not unit.strip():
            continue
        if current and len(current) + len(unit) + 2 > size:
            pieces.append(current)
            tail = current[-overlap:] if overlap else ""
            cut = tail.find(" ")
            current = (tail[cut + 1:] if cut >= 0 else tail) + "\n\n" + unit if overlap else unit
        else:
            current = f"{current}\n\n{unit}" if current else unit
    if current.strip():
        pieces.append(current)
    return pieces


def chunk_file(path: Path, source: str, *, size: int = 1000, overlap: int = 150) -> list[Chunk]:
    """The chunks of one text, markdown or PDF file."""
    if path.suffix.lower() == ".pdf":
        from pypdf import PdfReader

        try:
            pages = [page.extract_text() or "" for page in PdfReader(path).pages]
        except Exception as e:  # pypdf's own errors: a damaged or encrypted file
            raise ValueError(f"{source}: cannot read the PDF ({type(e).__name__}: {e})") from None
        return [Chunk(source, f"page {n}", piece, 0)
                for n, page in enumerate(pages, 1) for piece in windows(page, size=size, overlap=overlap)]
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = sections(text) if path.suffix.lower() in (".md", ".markdown") else [("Top", 1, text)]
    return [Chunk(source, title, piece, line)
            for title, line, body in parts for piece in windows(body, size=size, overlap=overlap)]


def files_under(paths: Iterable[str | Path]) -> list[Path]:
    """Every indexable file in `paths` (folders walked, hidden folders and files skipped), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{p}: not a text, markdown or PDF file ({', '.join(sorted(SUFFIXES))})")
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------------- the index

@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # cosine similarity to the query
    rank: int     # 1 = best


@dataclass
class Update:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    chunks: int = 0

    def __str__(self) -> str:
        return (f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
                f"{len(self.unchanged)} unchanged: {self.chunks} chunks")


def _embed(texts: Sequence[str]) -> np.ndarray:
    from hhh.models.embed import embed

    return np.ascontiguousarray(embed(texts), dtype=np.float32)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Index:
    """Chunks, their embeddings in a FAISS IndexFlatIP (unit vectors: inner product = cosine), and a manifest of
    the files they came from."""

    def __init__(self, folder: str | Path, chunks: list[Chunk], vectors: np.ndarray, files: dict[str, dict],
                 *, size: int = 1000, overlap: int = 150) -> None:
        self.folder, self.files, self.size, self.overlap = Path(folder), files, size, overlap
        self._set(chunks, vectors)

    def _set(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        import faiss

        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        self.chunks = chunks
        self.faiss = faiss.IndexFlatIP(DIM)
        if len(chunks):
            self.faiss.add(np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def vectors(self) -> np.ndarray:
        return self.faiss.reconstruct_n(0, self.faiss.ntotal) if self.faiss.ntotal else np.zeros((0, DIM), "float32")

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        import faiss

        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{folder}: no RAG index here (run: hhh rag index PATH... --index {folder})")
        manifest = json.loads(manifest_path.read_text())
        chunks = [Chunk(**json.loads(line)) for line in (folder / "chunks.jsonl").read_text().splitlines() if line]
        stored = faiss.read_index(str(folder / "index.faiss"))
        if stored.ntotal != len(chunks):
            raise ValueError(f"{folder}: index.faiss has {stored.ntotal} vectors for {len(chunks)} chunks "
                             f"(a damaged index: build it again with --rebuild)")
        vectors = stored.reconstruct_n(0, stored.ntotal) if stored.ntotal else np.zeros((0, DIM), "float32")
        return cls(folder, chunks, vectors, manifest["files"], size=manifest["chunk_size"],
                   overlap=manifest["chunk_overlap"])

    @classmethod
    def build(cls, paths: Iterable[str | Path], folder: str | Path, *, size: int = 1000, overlap: int = 150,
              rebuild: bool = False, progress=None) -> tuple[Index, Update]:
        """Index `paths` into `folder`; an index already there is updated (only new and changed files are read and
        embedded; chunks of files that no longer exist are dropped) unless `rebuild`."""
        folder = Path(folder)
        if (folder / "manifest.json").is_file() and not rebuild:
            index = cls.load(folder)
            if (index.size, index.overlap) != (size, overlap):
                raise ValueError(f"{folder}: built with chunks of {index.size}/{index.overlap} characters, asked "
                                 f"for {size}/{overlap}: pass --rebuild to start over")
        else:
            index = cls(folder, [], np.zeros((0, DIM), "float32"), {}, size=size, overlap=overlap)
        update = index.update(files_under(paths), progress=progress)
        index.save()
        return index, update

    def update(self, files: Sequence[Path], *, progress=None) -> Update:
        update = Update()
        digests = {str(f): _digest(f) for f in files}
        gone = [s for s in self.files if not Path(s).is_file()]
        stale = gone + [s for s, d in digests.items() if s in self.files and self.files[s]["sha256"] != d]
        fresh = [s for s, d in digests.items() if self.files.get(s, {}).get("sha256") != d]
        update.removed = gone
        update.changed = [s for s in fresh if s in self.files]
        update.added = [s for s in fresh if s not in self.files]
        update.unchanged = [s for s in digests if s not in fresh]
        keep = [i for i, c in enumerate(self.chunks) if c.source not in stale]
        chunks = [self.chunks[i] for i in keep]
        vectors = [self.vectors[keep]] if keep else []
        for s in gone:
            del self.files[s]
        for n, source in enumerate(fresh, 1):
            new = chunk_file(Path(source), source, size=self.size, overlap=self.overlap)
            # the section title goes in with the text: a chunk deep in a section still knows what it is about
            vectors.append(_embed([f"{c.section}\n{c.text}" for c in new]) if new else np.zeros((0, DIM), "float32"))
            chunks += new
            self.files[source] = {"sha256": digests[source], "chunks": len(new)}
            if progress is not None:
                progress(n, len(fresh), source)
        self._set(chunks, np.concatenate(vectors) if vectors else np.zeros((0, DIM), "float32"))
        update.chunks = len(chunks)
        return update

    def save(self) -> None:
        import faiss

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "index.faiss.tmp"
        faiss.write_index(self.faiss, str(tmp))
        (self.folder / "chunks.jsonl.tmp").write_text("".join(json.dumps(asdict(c)) + "\n" for c in self.chunks))
        (self.folder / "manifest.json.tmp").write_text(json.dumps(
            {"embedder": EMBEDDER, "chunk_size": self.size, "chunk_overlap": self.overlap, "files": self.files},
            indent=1) + "\n")
        for name in ("index.faiss", "chunks.jsonl", "manifest.json"):  # the manifest last: it marks a whole index
            (self.folder / f"{name}.tmp").replace(self.folder / name)

    def search(self, query: str, *, k: int = 5, mmr: bool = False, mmr_lambda: float = 0.7,
               candidates: int = 20) -> list[Hit]:
        """The `k` chunks closest to `query`; with `mmr`, chosen among the closest `candidates` to be relevant
        and unlike each other (score = lambda * relevance - (1 - lambda) * most similar chunk already chosen)."""
        if not self.chunks or k < 1:
            return []
        q = _embed([query])
        scores, ids = self.faiss.search(q, min(self.faiss.ntotal, max(k, candidates) if mmr else k))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        if mmr and len(pairs) > 1:
            vecs = self.faiss.reconstruct_batch(np.array([i for i, _ in pairs], dtype=np.int64))
            chosen: list[int] = []
            left = list(range(len(pairs)))
            while left and len(chosen) < k:
                def value(j: int) -> float:
                    redundancy = max((float(vecs[j] @ vecs[c]) for c in chosen), default=0.0)
                    return mmr_lambda * pairs[j][1] - (1 - mmr_lambda) * redundancy
                best = max(left, key=value)
                chosen.append(best)
                left.remove(best)
            pairs = [pairs[j] for j in chosen]
        return [Hit(self.chunks[i], s, r) for r, (i, s) in enumerate(pairs[:k], 1)]


# ---------------------------------------------------------------------------------------------------- asking

PROMPT = """Answer the question from the sources below. Use only what they say, cite each source you use by its \
number in square brackets, like [2], and answer in one or two sentences. If the sources do not answer the \
question, reply: {idk}.

{sources}

Question: {question}"""

# a worked example written for this project: the answer is in source 2, cited, in one sentence
EXAMPLE_SOURCES = [("kitchen.md § Rice", "Rinse the rice, then cook one part rice in two parts water for twelve "
                                         "minutes."),
                   ("kitchen.md § Bread", "Knead the dough for ten minutes and let it rise for an hour in a warm "
                                          "place before baking.")]
EXAMPLE_QUESTION = "How long should bread dough rise?"
EXAMPLE_ANSWER = "Let the dough rise for an hour in a warm place [2]."


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    hits: list[Hit]           # the sources the model was given, best first
    cited: list[int]          # the source numbers the answer cites (1-based, into hits)
    found: bool               # False: nothing relevant was retrieved and the model was not asked

    @property
    def citations(self) -> list[str]:
        return [self.hits[n - 1].chunk.citation for n in self.cited]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "found": self.found, "cited": self.citations,
                "sources": [{"n": h.rank, "citation": h.chunk.citation, "score": round(h.score, 4),
                             "text": h.chunk.text} for h in self.hits]}


def prompt(question: str, hits: Sequence[Hit], *, chars: int = 700) -> list[dict[str, str]]:
    """The conversation the model answers: the worked example, then the question with its numbered sources (each
    cut to `chars` characters: a small model's context is short)."""
    example = "\n\n".join(f"[{n}] ({where})\n{text}" for n, (where, text) in enumerate(EXAMPLE_SOURCES, 1))
    listing = "\n\n".join(f"[{h.rank}] ({h.chunk.citation})\n{h.chunk.text[:chars]}" for h in hits)
    return [{"role": "user", "content": PROMPT.format(sources=example, question=EXAMPLE_QUESTION, idk=I_DONT_KNOW)},
            {"role": "assistant", "content": EXAMPLE_ANSWER},
            {"role": "user", "content": PROMPT.format(sources=listing, question=question, idk=I_DONT_KNOW)}]


def cited_numbers(text: str, n: int) -> list[int]:
    """Source numbers cited in `text` ("[2]", "[1, 3]", "[1][2]"), in order of first mention, within 1..n."""
    out: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for number in map(int, group.split(",")):
            if 1 <= number <= n and number not in out:
                out.append(number)
    return out


def sentences(text: str) -> list[str]:
    """Sentences and list items of a chunk (markdown table rows and code lines count as one each)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`*(\[])|\n\s*(?:[-*]\s+|\d+\.\s+|\|)|\n{2,}", text)
    return [" ".join(p.split()) for p in parts if len(p.split()) >= 3]


def extract(question: str, hits: Sequence[Hit]) -> str:
    """The extractive answer (no language model): the sentence of the sources closest to the question in MiniLM
    space, quoted with its source number."""
    candidates = [(h.rank, s) for h in hits for s in sentences(h.chunk.text)]
    if not candidates:
        return I_DONT_KNOW
    vectors = _embed([question] + [s for _, s in candidates])
    best = int(np.argmax(vectors[1:] @ vectors[0]))
    rank, sentence = candidates[best]
    return f"{sentence} [{rank}]"


def ask(model, index: Index, questions: str | Sequence[str], *, k: int = 3, min_score: float = MIN_SCORE,
        mmr: bool = False, max_new_tokens: int = 160, temperature: float = 0.0, seed: int = 0,
        chars: int = 700) -> list[Answer]:
    """Answer each question from the index; `model`: anything with hhh.cai.critic's generate, or None for the
    extractive answer (the best-matching sentence of the sources, cited)."""
    questions = [questions] if isinstance(questions, str) else list(questions)
    found = [index.search(q, k=k, mmr=mmr) for q in questions]
    relevant = [bool(h) and h[0].score >= min_score for h in found]
    asked = [i for i, ok in enumerate(relevant) if ok]
    texts: dict[int, str] = {}
    if model is None:
        texts = {i: extract(questions[i], found[i]) for i in asked}
    elif asked:
        import torch

        generator = torch.Generator().manual_seed(seed)
        replies = model.generate([prompt(questions[i], found[i], chars=chars) for i in asked],
                                 max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
        texts = {i: r.text for i, r in zip(asked, replies, strict=True)}
    out = []
    for i, q in enumerate(questions):
        if not relevant[i]:
            best = f" (best match {found[i][0].score:.3f} < {min_score:.3f})" if found[i] else " (the index is empty)"
            out.append(Answer(q, f"{I_DONT_KNOW}: nothing in the index is close enough to the question{best}.",
                              found[i], [], False))
            continue
        out.append(Answer(q, texts[i], found[i], cited_numbers(texts[i], len(found[i])), True))
    return out


# ---------------------------------------------------------------------------------------------------- measuring

def _norm(text: str) -> str:
    return " ".join(text.lower().replace("`", "").replace("*", "").split())


@dataclass(frozen=True)
class Question:
    question: str
    source: str | None    # the file that answers it (None: nothing in the documents does)
    section: str | None   # its section heading
    answer: str | None    # a phrase of that section that is the answer


def read_questions(path: str | Path) -> list[Question]:
    """JSONL, one {"question", "source", "section", "answer"} per line (source null: an off-topic question)."""
    from hhh.data import read_jsonl

    out = []
    for n, row in read_jsonl(path):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"{path}:{n}: field 'question' must be a non-empty string")
        for key in ("source", "section", "answer"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"{path}:{n}: field {key!r} must be a string or null")
        if row.get("source") is not None and not (row.get("section") and row.get("answer")):
            raise ValueError(f"{path}:{n}: a question with a source needs 'section' and 'answer'")
        out.append(Question(row["question"], row.get("source"), row.get("section"), row.get("answer")))
    return out


def is_from(chunk: Chunk, q: Question) -> bool:
    return q.source is not None and Path(chunk.source).as_posix().endswith(q.source) and chunk.section == q.section


def retrieval_scores(index: Index, questions: Sequence[Question], *, k: int = 5, mmr: bool = False) -> dict:
    """recall@1, recall@k and MRR (over the first k) of the answering section, on the questions that have one."""
    ranks = []
    for q in questions:
        if q.source is None:
            continue
        hits = index.search(q.question, k=k, mmr=mmr)
        ranks.append(next((h.rank for h in hits if is_from(h.chunk, q)), None))
    n = len(ranks)
    return {"n": n, "recall@1": sum(r == 1 for r in ranks) / n if n else 0.0,
            f"recall@{k}": sum(r is not None for r in ranks) / n if n else 0.0,
            "mrr": sum(1 / r for r in ranks if r) / n if n else 0.0, "ranks": ranks}


def evaluate(model, index: Index, questions: Sequence[Question], *, k: int = 3, min_score: float = MIN_SCORE,
             mmr: bool = False, seed: int = 0, max_new_tokens: int = 160) -> dict:
    """Retrieval (recall@1, @5, MRR) and answers: faithful = cites a source that contains the answer phrase;
    correct = the answer states the phrase; and on off-topic questions, the share answered "I don't know"."""
    retrieval = retrieval_scores(index, questions, k=5, mmr=mmr)
    answers = ask(model, index, [q.question for q in questions], k=k, min_score=min_score, mmr=mmr, seed=seed,
                  max_new_tokens=max_new_tokens)
    rows, inside, outside = [], [], []
    for q, a in zip(questions, answers, strict=True):
        idk = (not a.found) or _norm(I_DONT_KNOW) in _norm(a.text)
        row = {**a.to_dict(), "expected": None if q.source is None else f"{q.source} § {q.section}",
               "gold": q.answer, "idk": idk}
        if q.source is None:
            outside.append(row)
        else:
            gold = _norm(q.answer or "")
            row["cites"] = bool(a.cited)
            row["faithful"] = any(gold in _norm(a.hits[n - 1].chunk.text) for n in a.cited)
            row["correct"] = gold in _norm(a.text)
            inside.append(row)
        rows.append(row)
    n_in, n_out = len(inside), len(outside)

    def share(rows_: list[dict], key: str) -> float:
        return sum(bool(r[key]) for r in rows_) / len(rows_) if rows_ else 0.0

    return {"model": "extractive" if model is None else getattr(model, "name", "?"), "k": k, "min_score": min_score, "mmr": mmr,
            "retrieval": {key: v for key, v in retrieval.items() if key != "ranks"},
            "answers": {"n": n_in, "faithful": share(inside, "faithful"), "cites": share(inside, "cites"),
                        "correct": share(inside, "correct"), "idk_on_answerable": share(inside, "idk"),
                        "off_topic_n": n_out, "idk_on_off_topic": share(outside, "idk")},
            "records": rows}
