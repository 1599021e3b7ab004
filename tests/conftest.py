import pytest
import torch

from hhh.models import DEFAULT_MODEL, load_tokenizer, tiny_causal_lm


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled model's real tokenizer (converted once into the user cache)."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture
def tiny(tokenizer):
    return tiny_causal_lm(tokenizer, seed=0)


def with_eos_bias(model, eos_id: int, bias: float):
    """Give a tiny model's LM head a bias towards EOS so completions end at varied lengths."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
    return model


@pytest.fixture
def tiny_dir(tokenizer, tmp_path_factory):
    """A tiny random model saved as a local HF folder, usable as a model spec."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL server on a Unix socket (Debian's postgresql package; make test installs it).
    Yields a function that creates a fresh database and returns its SQLAlchemy URL."""
    import itertools
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    assert initdb and pg_ctl, "PostgreSQL tests need the server: apt-get install postgresql (make test does this)"
    # the server refuses to run as root: run it as the postgres user the Debian package creates, in a folder it
    # can reach (pytest's own temporary folders are private to the user running the tests)
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="hhh-pg-"))
    if run_as:
        shutil.chown(root, "postgres")
    subprocess.run([*run_as, initdb, "-D", str(root / "data"), "-U", "hhh", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
                    "-o", f"-k {root} -p 54329 -c listen_addresses=''"], check=True, capture_output=True)
    import psycopg

    counter = itertools.count()

    def new_database() -> str:
        name = f"t{next(counter)}"
        with psycopg.connect(host=str(root), port=54329, user="hhh", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://hhh@/{name}?host={root}&port=54329"

    yield new_database
    subprocess.run([*run_as, pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ending_dir(tokenizer, tmp_path_factory):
    """A tiny model saved as a local folder whose completions end: every non-EOS token is equally likely and EOS
    much more, so at temperature 0.7 about 94% of completions end within 40 tokens, after ~14 (a random tiny model
    almost never samples EOS). Its final norm passes one residual dimension, which every token embedding sets to
    1 (EOS: 1.75); logits are embedding[token, 0] * normed[0], with normed[0] ~ sqrt(hidden) = 8."""
    path = tmp_path_factory.mktemp("ending-model")
    model = tiny_causal_lm(tokenizer, seed=0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[tokenizer.eos_token_id, 0] = 1.75
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
