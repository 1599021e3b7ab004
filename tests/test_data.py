import pytest

from hhh.data import DataError, load_prompts


def test_bundled_sets_sizes_and_disjoint_splits():
    red_train, red_eval = load_prompts("redteam:train"), load_prompts("redteam:eval")
    ben_train, ben_eval = load_prompts("benign:train"), load_prompts("benign:eval")
    assert len(red_train) + len(red_eval) >= 300 and len(ben_train) + len(ben_eval) >= 150
    assert not set(red_train) & set(red_eval) and not set(ben_train) & set(ben_eval)
    assert len(load_prompts("redteam")) == len(red_train) + len(red_eval)
    assert load_prompts("redteam:eval", limit=5) == red_eval[:5]


def test_heldout_red_team_prompts_share_no_template_with_training():
    """60 prompts written in other styles: no 4-word sequence of any of them occurs in a training prompt (the
    templated eval split shares whole frames with train), and `redteam` (all) leaves them out."""
    def grams(text):
        words = text.lower().replace(",", " ").replace(".", " ").split()
        return {tuple(words[i:i + 4]) for i in range(len(words) - 3)}

    heldout, train = load_prompts("redteam:heldout"), load_prompts("redteam:train")
    train_grams = set().union(*(grams(p) for p in train))
    assert len(heldout) == 60 and not set(heldout) & set(load_prompts("redteam"))
    shared = [p for p in heldout if grams(p) & train_grams]
    assert shared == [], shared
    assert any(grams(p) & train_grams for p in load_prompts("redteam:eval"))  # what the templated split does


def test_jsonl_prompts_and_line_numbered_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "extra": 1}\n')
    assert load_prompts(str(good)) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_prompts(str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:2: field 'prompt' must be a non-empty string"):
        load_prompts(str(missing))
    array = tmp_path / "array.jsonl"
    array.write_text('["a"]\n')
    with pytest.raises(DataError, match=r"array.jsonl:1: expected a JSON object"):
        load_prompts(str(array))


def test_csv_prompts(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('prompt,id\n"hello, world",1\nbye,2\n')
    assert load_prompts(str(f)) == ["hello, world", "bye"]
    g = tmp_path / "q.csv"
    g.write_text("question\nx\n")
    with pytest.raises(DataError, match=r"q.csv:1: header has no column 'prompt'"):
        load_prompts(str(g))
    h = tmp_path / "h.csv"
    h.write_text("prompt\nx\n\"\"\n")
    with pytest.raises(DataError, match=r"h.csv:3: field 'prompt'"):
        load_prompts(str(h))


@pytest.mark.parametrize("spec, message", [("redteam:test", "unknown split"), ("nothing", "no such file"),
                                           ("hf:", "needs a dataset name")])
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        load_prompts(spec)


def test_empty_file(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_prompts(str(f))


def test_hf_dataset_from_local_files(tmp_path):
    """hf:NAME goes through `datasets.load_dataset`; a local JSON dataset folder needs no network."""
    (tmp_path / "train.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    assert load_prompts(f"hf:{tmp_path}:train") == ["x", "y"]
