"""RAG: chunking at headings (not at '#' lines inside code), windows with overlap, a FAISS index on disk that
re-embeds only changed files, search and MMR, citations, "I don't know" below the threshold, the question set's
sections and answers present in the documents, and the measures worked by hand. Embeddings are the real MiniLM."""

import json
from pathlib import Path

import pytest

from hhh.apps.rag import (
    I_DONT_KNOW,
    Index,
    Question,
    ask,
    chunk_file,
    cited_numbers,
    evaluate,
    files_under,
    read_questions,
    retrieval_scores,
    sections,
    windows,
)
from hhh.cai.critic import Generated

ROOT = Path(__file__).resolve().parents[1]

DOC = """Intro line before any heading.

# Cooking rice

Rinse the rice until the water runs clear. Use one part rice to two parts water.

```bash
# this is a shell comment, not a heading
echo boil
```

## Resting

Let the rice rest for ten minutes with the lid on.

# Baking bread

Knead the dough for ten minutes, then let it rise for an hour in a warm place.
"""


def test_sections_follow_headings_but_not_code_comments():
    got = sections(DOC)
    assert [(t, line) for t, line, _ in got] == [("Top", 1), ("Cooking rice", 3), ("Resting", 12), ("Baking bread", 16)]
    assert "# this is a shell comment" in got[1][2]


def test_windows_overlap_and_respect_paragraphs():
    text = "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(6))  # ~165 characters each
    pieces = windows(text, size=400, overlap=60)
    assert len(pieces) > 1 and all(len(p) <= 400 for p in pieces)
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a[-30:].split()[-1] in b[:80]  # the next piece starts with the end of the one before
    assert all(any(f"Paragraph {i} " in p for p in pieces) for i in range(6))  # nothing lost
    long_line = "x" * 2500
    cut = windows(long_line, size=1000, overlap=100)
    assert [len(p) for p in cut] == [898, 1000, 806] and cut[1].startswith("x" * 100 + "\n\n")
    with pytest.raises(ValueError, match="chunk size 100 must be larger than the overlap 100 \\+ 2"):
        windows("a", size=100, overlap=100)


def test_files_of_every_kind_are_chunked(tmp_path):
    (tmp_path / "guide.md").write_text(DOC)
    (tmp_path / "notes.txt").write_text("Plain notes about tea.\n\nGreen tea wants cooler water.")
    # a one-page PDF with a line of text (matplotlib writes it with a TrueType font pypdf can read back)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig = plt.figure(figsize=(4, 2))
        fig.text(0.1, 0.5, "Coffee needs water at 93 degrees.")
        fig.savefig(tmp_path / "coffee.pdf")
        plt.close(fig)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.md").write_text("# no")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    found = files_under([tmp_path])
    assert [f.name for f in found] == ["coffee.pdf", "guide.md", "notes.txt"]
    pdf = chunk_file(tmp_path / "coffee.pdf", "coffee.pdf")
    assert pdf[0].section == "page 1" and "93 degrees" in pdf[0].text and pdf[0].citation == "coffee.pdf § page 1"
    txt = chunk_file(tmp_path / "notes.txt", "notes.txt")
    assert [c.section for c in txt] == ["Top"]
    md = chunk_file(tmp_path / "guide.md", "guide.md")
    assert [c.section for c in md] == ["Top", "Cooking rice", "Resting", "Baking bread"] and md[2].line == 12
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(ValueError, match="broken.pdf: cannot read the PDF"):
        chunk_file(tmp_path / "broken.pdf", "broken.pdf")
    with pytest.raises(ValueError, match="image.png: not a text, markdown or PDF file"):
        files_under([tmp_path / "image.png"])
    with pytest.raises(FileNotFoundError, match="nowhere.md: no such file"):
        files_under([tmp_path / "nowhere.md"])


def test_the_index_is_saved_searched_and_updated_incrementally(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text(DOC)
    (docs / "tea.md").write_text("# Tea\n\nGreen tea wants water at 80 degrees, black tea boiling water.\n")
    folder = tmp_path / "index"
    index, update = Index.build([docs], folder)
    assert (len(update.added), update.chunks) == (2, 5)
    hits = index.search("how long should bread rise?", k=2)
    assert hits[0].chunk.section == "Baking bread" and hits[0].rank == 1 and hits[0].score > hits[1].score

    # reloaded from disk: the same answers
    again = Index.load(folder)
    assert [h.chunk for h in again.search("how long should bread rise?", k=2)] == [h.chunk for h in hits]
    assert again.search("water temperature for green tea", k=1)[0].chunk.source.endswith("tea.md")

    # an update embeds only what changed
    from hhh.apps import rag

    embedded: list[str] = []
    real = rag._embed
    monkeypatch.setattr(rag, "_embed", lambda texts: embedded.extend(texts) or real(texts))
    (docs / "tea.md").write_text("# Tea\n\nOolong tea wants water at 90 degrees.\n")
    (docs / "coffee.md").write_text("# Coffee\n\nEspresso is brewed at nine bars of pressure.\n")
    (docs / "guide.md").unlink()
    index, update = Index.build([docs], folder)
    assert (update.added, update.changed, update.removed) == ([str(docs / "coffee.md")], [str(docs / "tea.md")],
                                                              [str(docs / "guide.md")])
    assert len([t for t in embedded if "Oolong" in t or "Espresso" in t]) == 2 and len(embedded) == 2
    assert {c.source for c in Index.load(folder).chunks} == {str(docs / "tea.md"), str(docs / "coffee.md")}
    assert Index.load(folder).search("oolong temperature", k=1)[0].chunk.text.startswith("Oolong")
    embedded.clear()
    _, update = Index.build([docs], folder)
    assert (update.added, update.changed, len(update.unchanged), embedded) == ([], [], 2, [])
    with pytest.raises(ValueError, match="pass --rebuild"):
        Index.build([docs], folder, size=500)
    with pytest.raises(FileNotFoundError, match="no RAG index here"):
        Index.load(tmp_path / "none")


def test_mmr_prefers_a_different_source_to_a_near_copy(tmp_path):
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "a.md").write_text("# Rice\n\nBoil rice in two parts water for twelve minutes.\n")
    (docs / "b.md").write_text("# Rice again\n\nBoil rice in two parts of water for twelve minutes.\n")
    (docs / "c.md").write_text("# Rice storage\n\nCooked rice keeps for a day in the fridge.\n")
    index, _ = Index.build([docs], tmp_path / "i")
    plain = [h.chunk.source[-4:] for h in index.search("how to boil rice", k=2)]
    diverse = [h.chunk.source[-4:] for h in index.search("how to boil rice", k=2, mmr=True, mmr_lambda=0.5)]
    assert sorted(plain) == ["a.md", "b.md"] and diverse[1] == "c.md"


class Echo:
    """A 'model' that answers with a fixed reply and keeps the prompts it was shown."""

    name = "echo"

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def generate(self, conversations, *, max_new_tokens, temperature, generator):
        self.prompts += conversations
        return [Generated(self.reply, True) for _ in conversations]


def test_answers_cite_sources_and_say_i_dont_know_when_nothing_is_close(tmp_path):
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "guide.md").write_text(DOC)
    index, _ = Index.build([docs], tmp_path / "i")
    model = Echo("Let it rise for an hour [1], after ten minutes of kneading [1][3].")
    bread, football = ask(model, index, ["How long does bread rise?", "Who won the 1998 football world cup?"],
                          k=3, min_score=0.3)
    assert bread.found and bread.cited == [1, 3] and bread.citations[0].endswith("guide.md § Baking bread")
    shown = model.prompts[0]
    assert [t["role"] for t in shown] == ["user", "assistant", "user"]  # the worked example, then the question
    assert shown[1]["content"].endswith("[2].") and "[1] (" in shown[2]["content"]
    assert shown[2]["content"].endswith("Question: How long does bread rise?")
    assert len(model.prompts) == 1  # the off-topic question never reached the model
    assert not football.found and football.text.startswith(f"{I_DONT_KNOW}: nothing in the index is close enough")
    assert cited_numbers("see [2], [1, 3] and [9] and [2]", 3) == [2, 1, 3]


def test_measures_by_hand(tmp_path):
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "guide.md").write_text(DOC)
    index, _ = Index.build([docs], tmp_path / "i")
    questions = [Question("How long should bread dough rise?", "guide.md", "Baking bread", "an hour"),
                 Question("How long should cooked rice rest?", "guide.md", "Resting", "ten minutes"),
                 Question("What ratio of water to rice?", "guide.md", "Cooking rice", "two parts water"),
                 Question("What is the capital of Peru?", None, None, None)]
    r = retrieval_scores(index, questions, k=5)
    ranks = r["ranks"]
    assert r["recall@1"] == pytest.approx(sum(x == 1 for x in ranks) / 3)
    assert r["mrr"] == pytest.approx(sum(1 / x for x in ranks if x) / 3)
    assert ranks[0] == 1  # the bread question finds its section first
    # a model that cites [1] and repeats the first source's first sentence
    report = evaluate(Echo("It says so in [1]: an hour."), index, questions, k=3, min_score=0.3)
    rec = report["records"]
    assert [x["faithful"] for x in rec[:3]] == [ranks[0] == 1 and "an hour" in rec[0]["sources"][0]["text"],
                                                "ten minutes" in rec[1]["sources"][0]["text"].lower(),
                                                "two parts water" in rec[2]["sources"][0]["text"]]
    assert [x["correct"] for x in rec[:3]] == [True, False, False]
    assert report["answers"]["idk_on_off_topic"] == 1.0 and rec[3]["idk"]


def test_question_files_are_validated(tmp_path):
    bad = tmp_path / "q.jsonl"
    for text, message in [('{"question": "x"}\nnot json\n', "q.jsonl:2: invalid JSON"), ("[1]\n", "expected a JSON object"),
                          ('{"question": ""}\n', ":1: field 'question' must be a non-empty string"),
                          ('{"question": "x", "source": "README.md"}\n', ":1: a question with a source needs"),
                          ('{"question": "x", "source": 3}\n', ":1: field 'source' must be a string or null")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_questions(bad)


def test_hhhs_own_question_set_points_at_sections_that_hold_the_answers():
    """Each question's section exists in the README or docs and contains the answer phrase, so the set keeps
    measuring something true when the documents change."""
    from hhh.apps.rag import _norm
    from hhh.cli import _rag_questions

    questions = read_questions(str(_rag_questions()))
    answerable = [q for q in questions if q.source is not None]
    assert len(answerable) >= 40 and len(questions) - len(answerable) >= 8
    for q in answerable:
        chunks = [c for c in chunk_file(ROOT / q.source, q.source, size=100_000, overlap=0) if c.section == q.section]
        assert chunks, f"{q.source} has no section {q.section!r} ({q.question})"
        assert _norm(q.answer) in _norm(" ".join(c.text for c in chunks)), f"{q.answer!r} not in {q.section!r}"
    assert len({q.question for q in questions}) == len(questions)
    json.dumps([q.__dict__ for q in questions])
