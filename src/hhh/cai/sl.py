"""Constitutional AI, supervised stage (SL-CAI; Bai et al. 2022, sec. 3).

    # 1. answer: the policy answers each red-team prompt
    # 2. critique: the critic reads worked examples, the prompt and the answer, and a principle's critique request
    #    (one principle per prompt and round, drawn from the seed)
    # 3. revision: the same conversation, the critique, and the principle's revision request; --rounds repeats 2-3
    #    on the latest revision
    # 4. filter: drop revisions that are truncated, empty, copied from the answer or the critique, or off-topic
    # 5. data: prompt -> final revision, mixed with benign prompts -> the policy's own answers (helpfulness kept;
    #    an answer cut at the token limit trains without EOS)
    # 6. SFT on that data (hhh.train.sft)

Every text is kept: RUN/sl/revisions.jsonl (one record per prompt: answer, each round's principle, critique and
revision, whether it was kept and why not), RUN/sl/benign.jsonl, RUN/sl/dataset.jsonl (what SFT trained on), and
the stage's preference store RUN/sl/feedback.db (the revision ranked above the answer by the AI labeler "cai:revision",
the critique kept as the revision's instruction). Generation is resumable by batch.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hhh import metrics as M
from hhh.cai.constitution import Constitution, Principle
from hhh.cai.critic import Critic
from hhh.config import CAIConfig
from hhh.runs import RunDir
from hhh.train.loop import GracefulStop, chunks, step_generator

REVISION_LABELER = "cai:revision"


# --- 2.-3. the conversations --------------------------------------------------------------------------------------
def worked_examples(constitution: Constitution, n: int) -> list[dict[str, str]]:
    """The first `n` worked examples as chat turns: prompt, answer, critique request, critique, revision request,
    revision; each under the requests of the principle it names."""
    turns: list[dict[str, str]] = []
    for ex in constitution.example[:n]:
        p = constitution.named(ex.principle)
        turns += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer},
                  {"role": "user", "content": p.critique}, {"role": "assistant", "content": ex.critique},
                  {"role": "user", "content": p.revision}, {"role": "assistant", "content": ex.revision}]
    return turns


def critique_conversation(constitution: Constitution, principle: Principle, prompt: str, answer: str,
                          few_shot: int) -> list[dict[str, str]]:
    return [*worked_examples(constitution, few_shot), {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer}, {"role": "user", "content": principle.critique}]


def revision_conversation(constitution: Constitution, principle: Principle, prompt: str, answer: str, critique: str,
                          few_shot: int) -> list[dict[str, str]]:
    return [*critique_conversation(constitution, principle, prompt, answer, few_shot),
            {"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]


# --- 1.-3. generation, resumable by batch ---------------------------------------------------------------------------
def read_records(path: Path) -> dict[int, dict[str, Any]]:
    """The records written so far, by prompt index (a half-written last line, from a killed run, is dropped)."""
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["index"]] = rec
    return done


def revise(config: CAIConfig, constitution: Constitution, prompts: Sequence[str], *, model, tokenizer,
           critic: Critic, run: RunDir, console) -> tuple[list[dict[str, Any]], bool]:
    """(one record per prompt, whether it finished): answer -> (critique -> revision) x rounds. Batches already in
    RUN/sl/revisions.jsonl are skipped; each batch draws from its own seeded generator, so a resumed run writes
    what an uninterrupted one would have."""
    from rich.progress import Progress

    from hhh.rollout import sample

    path = run.path / "sl" / "revisions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(path)
    device = next(model.parameters()).device
    parts = chunks(len(prompts), config.sample_batch_size)
    with GracefulStop(console) as stop, Progress(console=console, transient=True) as bar:
        task = bar.add_task("answer -> critique -> revision", total=len(prompts), completed=len(done))
        for b, part in enumerate(parts):
            index = list(range(len(prompts)))[part]
            if all(i in done for i in index):
                continue
            gen = step_generator(config.seed, b, device)
            batch = [prompts[i] for i in index]
            first = sample(model, tokenizer, batch, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, generator=gen)
            current = list(first.texts)
            rounds: list[list[dict[str, Any]]] = [[] for _ in index]
            for r in range(config.rounds):
                principles = [constitution.principle_for(config.seed, i * config.rounds + r) for i in index]
                critiques = critic.generate(
                    [critique_conversation(constitution, p, q, a, config.few_shot)
                     for p, q, a in zip(principles, batch, current, strict=True)],
                    max_new_tokens=config.critique_tokens, temperature=config.temperature, generator=gen)
                revisions = critic.generate(
                    [revision_conversation(constitution, p, q, a, c.text, config.few_shot)
                     for p, q, a, c in zip(principles, batch, current, critiques, strict=True)],
                    max_new_tokens=config.revision_tokens, temperature=config.temperature, generator=gen)
                for k, (p, c, v) in enumerate(zip(principles, critiques, revisions, strict=True)):
                    rounds[k].append({"principle": p.name, "critique": c.text, "critique_ended": c.ended,
                                      "revision": v.text, "revision_ended": v.ended})
                current = [v.text for v in revisions]
            with open(path, "a", encoding="utf-8") as f:
                for k, i in enumerate(index):
                    rec = {"index": i, "prompt": prompts[i], "answer": first.texts[k],
                           "answer_ended": bool(first.ended[k]), "rounds": rounds[k], "revision": current[k]}
                    f.write(json.dumps(rec) + "\n")
                    done[i] = rec
            run.log({"step": b + 1, M.CAI_REVISED: len(done)})
            bar.update(task, completed=len(done))
            if stop.requested and len(done) < len(prompts):
                return [done[i] for i in sorted(done)], False
    return [done[i] for i in range(len(prompts))], True


# --- 4. filters -------------------------------------------------------------------------------------------------------
def copy_ratio(a: str, b: str) -> float:
    """difflib's similarity ratio of two texts in [0, 1] (1: identical), on their lower-cased words (punctuation
    aside)."""
    words = lambda t: re.findall(r"\w+", t.lower())  # noqa: E731
    return difflib.SequenceMatcher(None, words(a), words(b), autojunk=False).ratio()


def filter_reason(rec: dict[str, Any], relevance: float, config: CAIConfig) -> str | None:
    """Why a revision may not train anything (None: it may), in this order:
    truncated (cut at --revision-tokens, so it never ended), empty (< --min-words words), copied (difflib ratio >=
    --max-copy to the answer it revised or to its own critique), off-topic (MiniLM cosine to the prompt below
    --min-relevance)."""
    last = rec["rounds"][-1]
    text = rec["revision"]
    if not last["revision_ended"]:
        return "truncated"
    if len(text.split()) < config.min_words:
        return "empty"
    revised = rec["rounds"][-2]["revision"] if len(rec["rounds"]) > 1 else rec["answer"]
    if copy_ratio(text, revised) >= config.max_copy or copy_ratio(text, last["critique"]) >= config.max_copy:
        return "copied"
    if relevance < config.min_relevance:
        return "off-topic"
    return None


def apply_filters(records: list[dict[str, Any]], config: CAIConfig) -> dict[str, Any]:
    """Mark each record kept or not (with the reason and the revision's relevance); return the counts."""
    from hhh.models.embed import cosine

    relevance = cosine([r["prompt"] for r in records], [r["revision"] or " " for r in records]).tolist()
    counts: dict[str, int] = {"truncated": 0, "empty": 0, "copied": 0, "off-topic": 0}
    for rec, rel in zip(records, relevance, strict=True):
        rec["relevance"] = round(float(rel), 4)
        rec["reason"] = filter_reason(rec, rel, config)
        rec["kept"] = rec["reason"] is None
        if rec["reason"]:
            counts[rec["reason"]] += 1
    kept = sum(r["kept"] for r in records)
    return {"revisions": len(records), "kept": kept, "filtered": counts,
            "filtered_share": 1 - kept / len(records) if records else 0.0}


# --- 5. benign answers and the SFT data --------------------------------------------------------------------------------
def benign_answers(config: CAIConfig, prompts: Sequence[str], *, model, tokenizer, run: RunDir) -> list[dict]:
    """The policy's own answers to benign prompts, cached in RUN/sl/benign.jsonl; those cut at --revision-tokens
    train without EOS (their content keeps the model helpful; their cut must not teach it to stop mid-sentence)."""
    from hhh.rollout import sample

    path = run.path / "sl" / "benign.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for b, part in enumerate(chunks(len(prompts), config.sample_batch_size)):
        gen = step_generator(config.seed, b, device, stream=3)
        roll = sample(model, tokenizer, list(prompts[part]), max_new_tokens=config.revision_tokens,
                      temperature=config.temperature, generator=gen)
        rows += [{"prompt": p, "answer": t, "ended": bool(e), "kept": len(t.split()) >= config.min_words}
                 for p, t, e in zip(roll.prompts, roll.texts, roll.ended.tolist(), strict=True)]
    write_jsonl(path, rows)
    return rows


def to_store(store_path: Path, records: list[dict[str, Any]], *, model: str, critic: str) -> int:
    """Every prompt, answer and revision into the preference store; each kept revision ranked above the texts it
    revised by the AI labeler "cai:revision" (the critique is the revision's instruction). Prompts it ranked
    before are left alone (a resumed run adds nothing twice). Returns the rankings added."""
    from sqlalchemy import select

    from hhh.feedback.store import Ranking, Store

    store = Store(str(store_path))
    labeler = store.ai_labeler(REVISION_LABELER)
    with store.read() as s:
        ranked = set(s.scalars(select(Ranking.prompt_id).where(Ranking.labeler_id == labeler)))
    added = 0
    for rec in records:
        pid = store.add_prompt(rec["prompt"], source="cai")
        ids = [store.add_completion(pid, rec["answer"], model=model)]
        for rnd in rec["rounds"]:
            ids.append(store.add_completion(pid, rnd["revision"], model=critic,
                                            instruction=f"[{rnd['principle']}] critique: {rnd['critique']}"))
        order = list(dict.fromkeys(reversed(ids)))  # latest revision first; identical texts are one completion
        if rec.get("kept") and pid not in ranked and len(order) > 1:
            store.submit(labeler, pid, [[i] for i in order], submission_id=f"cai-revision-{pid}")
            added += 1
    return added


def sft_data(records: list[dict[str, Any]], benign: list[dict[str, Any]]):
    from hhh.data.demos import Demos

    kept = [r for r in records if r["kept"]]
    good = [b for b in benign if b["kept"]]
    return Demos([r["prompt"] for r in kept] + [b["prompt"] for b in good],
                 [r["revision"] for r in kept] + [b["answer"] for b in good],
                 [True] * len(kept) + [bool(b["ended"]) for b in good])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
