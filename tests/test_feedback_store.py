import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from hhh.data import DataError
from hhh.feedback.agreement import agreement
from hhh.feedback.io import export_jsonl, import_jsonl, split_hh
from hhh.feedback.migrations import current
from hhh.feedback.store import Base, Store, StoreError


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """3 prompts with 3 completions each: prompt i has completions 3i+1, 3i+2, 3i+3; on SQLite and on PostgreSQL."""
    s = Store(tmp_path / "fb.db" if request.param == "sqlite" else request.getfixturevalue("postgres")())
    for i in range(3):
        pid = s.add_prompt(f"prompt {i}")
        for letter in "abc":
            s.add_completion(pid, f"{letter}{i}", model="m")
    return s


def labeler(store, name, role="labeler"):
    return store.labeler_for_token(store.add_labeler(name, role=role)).id


def test_migrations_build_exactly_the_models_schema(store):
    assert current(store.url) == "0004"
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if store.url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_reopening_keeps_everything_and_does_not_migrate_twice(store):
    ann = labeler(store, "ann")
    store.submit(ann, 1, [[1], [2], [3]], submission_id="s1")
    again = Store(store.url)
    assert again.counts() == {"prompts": 3, "completions": 9, "labelers": 1, "rankings": 1, "pairs": 3, "skips": 0,
                                   "served": 0, "served_feedback": 0}


def test_a_store_at_revision_0001_upgrades_and_keeps_its_labels(tmp_path):
    """A store made before sessions and token expiry: opening it migrates to 0002; old tokens keep working
    (no expiry), and the new session table works."""
    from hhh.feedback.migrations import upgrade

    path = tmp_path / "old.db"
    old = Store(path, migrate=False)
    upgrade(old.url, "0001")
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO labelers (name, role, token_hash, created_at) VALUES "
                          "('ann', 'labeler', :h, '2026-11-01 00:00:00')"), {"h": __import__("hashlib").sha256(b"tok").hexdigest()})
    store = Store(path)
    assert current(store.url) == "0004"
    ann = store.labeler_for_token("tok")
    assert ann is not None and ann.name == "ann"
    assert store.labeler_for_session(store.start_session(ann.id)).name == "ann"


def test_tokens_expire_revoke_and_renew(store):
    token = store.add_labeler("ann", days=-1)  # already expired
    assert store.labeler_for_token(token) is None
    token = store.new_token("ann")
    ann = store.labeler_for_token(token)
    session = store.start_session(ann.id)
    assert store.labeler_for_session(session).name == "ann"
    assert store.labeler_for_session(store.start_session(ann.id, hours=-1)) is None  # expired session
    store.end_session(session)
    assert store.labeler_for_session(session) is None
    session = store.start_session(ann.id)
    assert store.revoke_labeler("ann") == 1
    assert store.labeler_for_token(token) is None and store.labeler_for_session(session) is None
    with pytest.raises(StoreError, match="no labeler named 'bob'"):
        store.revoke_labeler("bob")


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "x" * 201])
def test_a_labeler_needs_a_printable_name(store, name):
    with pytest.raises(StoreError, match="1 to 200 printable"):
        store.add_labeler(name)
    assert store.counts()["labelers"] == 0


def test_a_new_sqlite_store_is_private_and_a_missing_one_is_not_created_for_reading(tmp_path):
    import os
    import stat

    Store(tmp_path / "new.db")
    assert stat.S_IMODE(os.stat(tmp_path / "new.db").st_mode) == 0o600
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "typo.db", create=False)
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)


def test_error_messages_never_show_the_database_password():
    from hhh.feedback.store import masked_url

    url = "postgresql+psycopg://ann:s3cret@db.example:5432/fb"
    assert masked_url(url) == "postgresql+psycopg://ann:***@db.example:5432/fb"
    with pytest.raises(StoreError) as e:
        Store("nosuchdriver+x://ann:s3cret@host/db")
    assert "s3cret" not in str(e.value)


def test_identical_prompts_and_completions_are_stored_once(store):
    assert store.add_prompt("prompt 0") == 1
    assert store.add_completion(1, "a0", model="other") == 1
    assert store.counts()["completions"] == 9


def test_submit_refusals_change_nothing(store):
    ann = labeler(store, "ann")
    rid = store.submit(ann, 1, [[2], [1, 3]], submission_id="s1", unsafe=[3])
    before = store.counts()
    cases = [
        (dict(prompt_id=1, tiers=[[2], [1, 3]], submission_id="s1"), 409, "duplicate submission"),
        (dict(prompt_id=1, tiers=[[1], [2], [3]], submission_id="s2"), 409, "already ranked prompt 1"),
        (dict(prompt_id=2, tiers=[[4], [5]], submission_id="s3"), 400, "missing [6]"),
        (dict(prompt_id=2, tiers=[[4], [5], [6]], submission_id="s4", unsafe=[1]), 400, "not completions of prompt 2"),
        (dict(prompt_id=99, tiers=[[1]], submission_id="s5"), 404, "no prompt with id 99"),
        (dict(prompt_id=2, tiers=[[4], [5], [6]], submission_id=""), 400, "submission_id"),
    ]
    for kwargs, status, message in cases:
        with pytest.raises(StoreError) as e:
            store.submit(ann, **kwargs)
        assert e.value.status == status and message in str(e.value)
    assert store.counts() == before
    assert store.rankings()[0]["tiers"] == [[2], [1, 3]] and rid == 1


def test_edit_rewrites_the_pairs_and_only_the_owner_may(store):
    ann, bob = labeler(store, "ann"), labeler(store, "bob")
    rid = store.submit(ann, 1, [[1], [2], [3]], submission_id="s1")
    with pytest.raises(StoreError) as e:
        store.submit(bob, 1, [[3], [2], [1]], submission_id="s2", edit=rid)
    assert e.value.status == 404
    store.submit(ann, 1, [[3], [1, 2]], submission_id="s3", edit=rid)
    pairs = store.pairs()
    assert {(p["chosen"], p["rejected"], p["tie"]) for p in pairs} == {("c0", "a0", False), ("c0", "b0", False),
                                                                       ("a0", "b0", True)}
    assert store.rankings(labeler_id=ann)[0]["revision"] == 2 and store.rankings(labeler_id=bob) == []


def test_next_item_respects_overlap_skips_and_own_rankings(store):
    ann, bob, cy = (labeler(store, n) for n in ("ann", "bob", "cy"))
    assert store.next_item(ann, overlap=1)["prompt_id"] == 1
    store.skip(ann, 1)
    assert store.next_item(ann, overlap=1)["prompt_id"] == 2
    store.submit(bob, 2, [[4], [5], [6]], submission_id="b2")
    # prompt 2 has its one label; ann gets 3 next, while with overlap 2 the least-labelled prompt still comes first
    assert store.next_item(ann, overlap=1)["prompt_id"] == 3
    assert store.next_item(cy, overlap=2)["prompt_id"] == 1
    store.submit(cy, 1, [[1], [2], [3]], submission_id="c1")
    store.submit(cy, 3, [[7], [8], [9]], submission_id="c3")
    assert store.next_item(cy, overlap=2)["prompt_id"] == 2
    assert store.progress(ann, overlap=1) == {"ranked": 0, "skipped": 1, "remaining": 0}
    assert store.progress(cy, overlap=2) == {"ranked": 2, "skipped": 0, "remaining": 1}
    # AI labels do not count toward the overlap
    ai = store.ai_labeler("ai:toxicity")
    store.submit(ai, 2, [[4], [5], [6]], submission_id="ai2")
    assert store.next_item(cy, overlap=2)["prompt_id"] == 2


def test_pairs_filter_by_source_and_ties(store):
    ann, ai = labeler(store, "ann"), store.ai_labeler("ai:x")
    store.submit(ann, 1, [[1, 2], [3]], submission_id="h")
    store.submit(ai, 2, [[4], [5], [6]], submission_id="a")
    assert len(store.pairs()) == 6
    assert len(store.pairs(ties=False)) == 5
    assert {p["source"] for p in store.pairs(source="ai")} == {"ai"} and len(store.pairs(source="human")) == 3
    assert {p["labeler"] for p in store.pairs(labelers=["ann"])} == {"ann"} and store.pairs(labelers=["zed"]) == []


def test_pairs_jsonl_round_trip_with_margin_and_hh_transcripts(tmp_path):
    src = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 2.0},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"prompt": "p3", "chosen": "x", "rejected": "y", "tie": True, "labeler": "zoe"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = Store(tmp_path / "a.db")
    assert import_jsonl(store, src) == {"rankings": 3, "skipped": 0}
    assert import_jsonl(store, src) == {"rankings": 0, "skipped": 3}  # importing twice adds nothing
    out = tmp_path / "out.jsonl"
    assert export_jsonl(store, out, "pairs") == 2  # the tie is left out by default
    back = [json.loads(line) for line in out.read_text().splitlines()]
    assert back[0] == {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 2.0, "labeler": "import",
                       "source": "human"}
    assert (back[1]["prompt"], back[1]["chosen"], back[1]["rejected"]) == ("\n\nHuman: hi\n\nAssistant:", "hello there",
                                                                            "go away")
    assert export_jsonl(store, out, "pairs", ties=True) == 3
    assert json.loads(out.read_text().splitlines()[2])["tie"] is True


def test_rankings_jsonl_round_trip(store, tmp_path):
    ann = labeler(store, "ann")
    store.submit(ann, 1, [[2], [1, 3]], submission_id="s1", unsafe=[3])
    store.submit(store.ai_labeler("ai:x"), 2, [[6], [4], [5]], submission_id="s2")
    out = tmp_path / "rankings.jsonl"
    assert export_jsonl(store, out, "rankings") == 2
    other = Store(tmp_path / "other.db")
    import_jsonl(other, out)
    assert [(r["labeler"], r["role"], r["tiers"], r["unsafe"]) for r in other.rankings()] == [
        ("ann", "labeler", [[2], [1, 3]], [3]), ("ai:x", "ai", [[6], [4], [5]], [])]
    assert export_jsonl(other, tmp_path / "again.jsonl", "rankings") == 2
    first = [json.loads(x) for x in out.read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [(r["prompt"], sorted(r["completions"])) for r in first] == [(r["prompt"], sorted(r["completions"])) for r in again]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "a"}', "field 'rejected' must be a non-empty string"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "the same text"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}', "field 'margin' must be a number"),
        ('{"chosen": "a", "rejected": "b"}', "no 'prompt' field"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [0]]}', "field 'ranking'"),
        ('{"prompt": "p", "completions": ["a"], "ranking": [[0]]}', "at least 2 strings"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [1]], "unsafe": [true]}', "field 'unsafe'"),
        ("{not json", "invalid JSON"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_written(tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    store = Store(tmp_path / "x.db")
    with pytest.raises(DataError) as e:
        import_jsonl(store, src)
    assert f"{src}:2" in str(e.value) and message in str(e.value)
    assert store.counts()["rankings"] == 0 and store.counts()["prompts"] == 0


def test_split_hh_needs_a_shared_transcript():
    with pytest.raises(ValueError):
        split_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: other\n\nAssistant: c")


def test_agreement_by_hand(store):
    """ann and bob on prompt 1 (ids 1,2,3) and on (4, 5) of prompt 2.
    ann: 1>2>3, 4=5 -> units (1,2)+1 (1,3)+1 (2,3)+1 (4,5)0 ... (4,6),(5,6) also ranked, see below.
    To keep the arithmetic small, prompt 2 is ranked [[4, 5], [6]] by ann and [[4], [5], [6]] by bob:
      units: (1,2) +1/+1, (1,3) +1/+1, (2,3) +1/-1, (4,5) 0/+1, (4,6) +1/+1, (5,6) +1/+1
      agreement 4/6. Cohen: ann marginals {+1: 5/6, 0: 1/6}, bob {+1: 5/6, -1: 1/6};
      p_e = (5/6)^2 = 25/36, kappa = (4/6 - 25/36) / (1 - 25/36) = (-1/36) / (11/36) = -1/11."""
    ann, bob = labeler(store, "ann"), labeler(store, "bob")
    store.submit(ann, 1, [[1], [2], [3]], submission_id="a1")
    store.submit(bob, 1, [[1], [3], [2]], submission_id="b1")
    store.submit(ann, 2, [[4, 5], [6]], submission_id="a2")
    store.submit(bob, 2, [[4], [5], [6]], submission_id="b2")
    store.submit(store.ai_labeler("ai:x"), 1, [[3], [2], [1]], submission_id="ai")  # left out of the statistics
    stats = agreement(store.rankings())
    assert stats["labelers"] == 2 and stats["units"] == 6
    assert stats["percent_agreement"] == pytest.approx(4 / 6)
    (pair,) = stats["pairs"]
    assert (pair["a"], pair["b"], pair["shared"]) == ("ann", "bob", 6)
    assert pair["cohen_kappa"] == pytest.approx(-1 / 11)
    assert stats["krippendorff_alpha"] < 0.5


def test_perfect_agreement_gives_alpha_and_kappa_1(store):
    ann, bob = labeler(store, "ann"), labeler(store, "bob")
    for who, tag in ((ann, "a"), (bob, "b")):
        store.submit(who, 1, [[1], [2, 3]], submission_id=f"{tag}1")
        store.submit(who, 2, [[6], [5], [4]], submission_id=f"{tag}2")
    stats = agreement(store.rankings())
    assert stats["percent_agreement"] == 1.0 and stats["pairs"][0]["cohen_kappa"] == pytest.approx(1.0)
    assert stats["krippendorff_alpha"] == pytest.approx(1.0)


def test_labeler_names_are_unique_and_tokens_are_not_stored(store):
    token = store.add_labeler("ann")
    with pytest.raises(StoreError) as e:
        store.add_labeler("ann")
    assert e.value.status == 409
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT token_hash FROM labelers")).scalar()
    assert stored != token and len(stored) == 64
    assert store.labeler_for_token(token).name == "ann" and store.labeler_for_token("wrong") is None


def test_pairs_of_one_ranking_are_merged_back_into_it(store, tmp_path):
    """An export of pairs imports as the rankings it came from (margins kept per pair), with its ties or without."""
    ann = labeler(store, "ann")
    store.submit(ann, 1, [[2], [1, 3]], submission_id="s1")
    store.submit(ann, 2, [[6], [5], [4]], submission_id="s2")
    out = tmp_path / "pairs.jsonl"
    export_jsonl(store, out, "pairs", ties=True)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    lines[0]["margin"] = 1.5
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    other = Store(tmp_path / "other.db")
    assert import_jsonl(other, out) == {"rankings": 2, "skipped": 0}
    texts = {c["id"]: c["text"] for it in other.items() for c in it["completions"]}
    got = [[[texts[c] for c in tier] for tier in r["tiers"]] for r in other.rankings()]
    assert got == [[["b0"], ["a0", "c0"]], [["c1"], ["b1"], ["a1"]]]
    assert [p["margin"] for p in other.pairs()].count(1.5) == 1
    export_jsonl(store, out, "pairs")  # ties left out: the missing comparison a0-c0 is read as the tie it was
    third = Store(tmp_path / "third.db")
    import_jsonl(third, out)
    assert [r["tiers"] for r in third.rankings()] == [[[1], [2, 3]], [[4], [5], [6]]]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("a", "b"), ("b", "c"), ("c", "a")], "do not form one ranking"),   # a cycle
        ([("a", "b"), ("c", "d")], "do not form one ranking"),               # a partial order
        ([("a", "b"), ("a", "c"), ("b", "d")], "do not form one ranking"),   # c-d unstated, but c, d differ
        ([("a", "b"), ("b", "a")], "already compared"),
    ],
)
def test_pairs_that_are_not_a_ranking_are_refused(tmp_path, rows, message):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": "p", "chosen": c, "rejected": r}) + "\n" for c, r in rows))
    store = Store(tmp_path / "x.db")
    with pytest.raises(DataError) as e:
        import_jsonl(store, src)
    assert message in str(e.value) and f"{src}:" in str(e.value) and store.counts()["rankings"] == 0


def test_soft_labels_keep_their_probability(store):
    """An AI label with a probability: every ordered pair of the ranking carries it; a hard label has none; a
    probability outside [0.5, 1] (the better completion's) is refused."""
    from hhh.feedback.store import StoreError

    ai = store.ai_labeler("ai:judge")
    store.submit(ai, 1, [[1], [2, 3]], submission_id="a1", probability=0.73)
    ann = labeler(store, "ann")
    store.submit(ann, 2, [[4], [5], [6]], submission_id="h1")
    pairs = store.pairs()
    assert [(p["chosen_id"], p["rejected_id"], p["probability"]) for p in pairs if p["source"] == "ai"] == [
        (1, 2, 0.73), (1, 3, 0.73), (2, 3, None)]  # the tie carries no probability
    assert {p["probability"] for p in pairs if p["source"] == "human"} == {None}
    with pytest.raises(StoreError, match="probability must be in"):
        store.submit(ai, 3, [[7], [8], [9]], submission_id="a2", probability=0.3)


def test_soft_labels_round_trip_through_jsonl(store, tmp_path):
    src = tmp_path / "ai.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "kind", "rejected": "rude", "probability": 0.8,
                               "source": "ai", "labeler": "ai:critic"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "x", "rejected": "y"}) + "\n")
    import_jsonl(store, src)
    out = tmp_path / "out.jsonl"
    export_jsonl(store, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r.get("probability")) for r in rows] == [("p", 0.8), ("q", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "probability": 0.2}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'probability' must be a number in \[0.5, 1\]"):
        import_jsonl(store, bad)


def test_served_feedback_implies_pairs_worked_by_hand(store):
    """Two responses to one prompt (choices 0/1 and 0), one to a conversation. By hand: thumbs make up > down,
    except an answer with both an up and a down; mean ratings order answers (margin = difference); the preferred
    choice beats the response's other choices; an edit beats what it edits."""
    from hhh.feedback.store import StoreError

    store.record_served("r1", "Q?", ["A", "B"], model="m", adapter=None, served_as="tiny")
    store.record_served("r2", "Q?", ["C"], model="m", adapter="runs/x/adapter", served_as="aligned")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "And?"}]
    store.record_served("r3", conversation, ["D", "E"], model="m", adapter=None, served_as="tiny")
    give = store.add_served_feedback
    give("r1", "thumbs", 1, choice=0)
    give("r1", "thumbs", -1, choice=1)
    give("r2", "thumbs", 1, choice=0)
    give("r2", "thumbs", -1, choice=0)        # C is both up and down: no thumbs pair for it
    give("r1", "rating", 4, choice=0)
    give("r1", "rating", 2, choice=0)         # A's mean rating: 3
    give("r2", "rating", 5, choice=0)         # C: 5 -> C over A by 2
    give("r3", "preferred", 1)                # E over D
    give("r3", "edit", "  F  ", choice=0)     # F (stripped) over D
    pairs = {(p["chosen"], p["rejected"]): p for p in store.served_pairs()}
    assert set(pairs) == {("A", "B"), ("C", "A"), ("E", "D"), ("F", "D")}
    assert pairs[("C", "A")]["margin"] == 2.0 and pairs[("A", "B")]["margin"] is None
    assert pairs[("E", "D")]["prompt"] == conversation  # a conversation comes back as its messages
    assert pairs[("A", "B")]["prompt"] == "Q?"
    assert {p["source"] for p in store.pairs()} >= {"served"} and store.pairs(source="human") == []
    for args, message in ((("r9", "thumbs", 1), "no served response 'r9'"),
                          (("r1", "thumbs", 1, 5), "has no choice 5 \\(it has 2\\)"),
                          (("r1", "rating", 6), "rating must be an integer from 1 to 5"),
                          (("r1", "edit", "  "), "non-empty"),
                          (("r1", "shrug", 1), "feedback kind")):
        with pytest.raises(StoreError, match=message):
            give(*args[:3], **({"choice": args[3]} if len(args) > 3 else {}))
    give("r1", "thumbs", 1, feedback_id="once")
    with pytest.raises(StoreError, match="already saved") as refused:
        give("r1", "thumbs", 1, feedback_id="once")
    assert refused.value.status == 409 and store.counts()["served_feedback"] == 10
