"""The preference store: prompts, completions, labelers, rankings and the pairs they imply.

Any SQLAlchemy URL works; a bare path means a SQLite file, opened in WAL mode with synchronous=FULL so a
committed ranking survives a killed server (and a power cut). Writes on SQLite take the lock up front
(BEGIN IMMEDIATE): two labelers submitting at once queue behind busy_timeout instead of failing on a
lock upgrade. The schema is created and upgraded by the Alembic migrations in `migrations/`.

    >>> store = Store("feedback.db")                      # doctest: +SKIP
    >>> pid = store.add_prompt("How do I bake bread?")    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    CursorResult,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from hhh.config import SESSION_HOURS, TOKEN_DAYS
from hhh.feedback.rankings import RankingError, check_tiers, tiers_to_pairs


def _table(model) -> Table:
    """The mapped class's table, for bulk statements that skip the ORM's per-object bookkeeping."""
    return cast(Table, model.__table__)

def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def text_hash(text: str) -> str:
    """Unique keys on long text are index-size trouble in PostgreSQL; rows are keyed by this instead."""
    return hashlib.sha256(text.encode()).hexdigest()


def _expiry(days: float | None) -> datetime | None:
    return None if days is None else _now() + timedelta(days=days)


def _labeler_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 200 or not name.isprintable():
        raise StoreError("a labeler name must be 1 to 200 printable characters")
    return name


class Base(DeclarativeBase):
    pass


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    completions: Mapped[list[Completion]] = relationship(back_populates="prompt", order_by="Completion.id")


class Completion(Base):
    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("prompt_id", "text_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(300))            # model spec that produced it ("import" for imports)
    adapter: Mapped[str | None] = mapped_column(String(500))   # PEFT adapter folder, if any
    instruction: Mapped[str | None] = mapped_column(Text)      # text prepended to the prompt when sampling
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    prompt: Mapped[Prompt] = relationship(back_populates="completions")


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # "labeler", "admin" or "ai"
    # sha256 of the token; None for AI labelers and once revoked
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime)  # None: never
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


class LoginSession(Base):
    """A browser's login: the cookie holds this session's random token, never the labeler's own token, so that
    logging out (or revoking the labeler) ends it at once, and it expires on its own."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Ranking(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("prompt_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    submission_id: Mapped[str] = mapped_column(String(64), unique=True)  # client-made; a resend is refused
    tiers: Mapped[list] = mapped_column(JSON)      # [[completion id, ...], ...] best first; a tier is a tie
    unsafe: Mapped[list] = mapped_column(JSON)     # completion ids flagged unsafe
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    labeler: Mapped[Labeler] = relationship()
    prompt: Mapped[Prompt] = relationship()
    pairs: Mapped[list[Pair]] = relationship(back_populates="ranking", cascade="all, delete-orphan")


class Pair(Base):
    """Derived from a ranking (rewritten when it is edited), or imported with an optional margin."""

    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ranking_id: Mapped[int] = mapped_column(ForeignKey("rankings.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    better_id: Mapped[int] = mapped_column(ForeignKey("completions.id"))
    worse_id: Mapped[int] = mapped_column(ForeignKey("completions.id"))
    tie: Mapped[bool] = mapped_column(Boolean, default=False)
    margin: Mapped[float | None] = mapped_column(Float)
    # a soft label: P(better is better), e.g. an AI feedback model's normalised choice probability; None: a hard label
    probability: Mapped[float | None] = mapped_column(Float)
    ranking: Mapped[Ranking] = relationship(back_populates="pairs")


class Skip(Base):
    __tablename__ = "skips"
    __table_args__ = (UniqueConstraint("prompt_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


class Served(Base):
    """One choice of a response that `hhh serve` answered: the completion it produced, under the response id the
    client got."""

    __tablename__ = "served"
    __table_args__ = (UniqueConstraint("response_id", "choice"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(80), index=True)
    choice: Mapped[int] = mapped_column(Integer)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    completion_id: Mapped[int] = mapped_column(ForeignKey("completions.id"))
    served_as: Mapped[str] = mapped_column(String(300))          # the request's `model`: base or an adapter's name
    user: Mapped[str | None] = mapped_column(String(200))        # the request's `user` field, if sent
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


class ServedFeedback(Base):
    """A served answer judged by its user: thumbs (+1 / -1), a 1-5 rating, the preferred one of n choices, or an
    edited better answer (a completion of its own, model "edit")."""

    __tablename__ = "served_feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feedback_id: Mapped[str] = mapped_column(String(64), unique=True)  # client-made or ours; a resend is refused
    served_id: Mapped[int] = mapped_column(ForeignKey("served.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))                      # thumbs, rating, preferred, edit
    value: Mapped[float | None] = mapped_column(Float)                 # +1/-1, 1..5; None for preferred and edit
    edit_completion_id: Mapped[int | None] = mapped_column(ForeignKey("completions.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)


FEEDBACK_KINDS = ("thumbs", "rating", "preferred", "edit")
SERVED_CHAT = "served:chat"  # a served conversation of several messages: the prompt text is their JSON


class StoreError(ValueError):
    """A request the store refuses (unknown prompt, duplicate submission...); str() is one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status the web app answers with


def database_url(db: str) -> str:
    """A SQLAlchemy URL as is; anything else is a SQLite file path."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser()}"


def masked_url(url: str) -> str:
    """The URL with its password shown as ***, for banners, logs and error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None




def _sqlite_engine(url: str, *, immediate: bool):
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own is deferred)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # WAL + NORMAL may lose the last commits on power loss
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Store:
    def __init__(self, db: str | Path, *, migrate: bool = True, create: bool = True) -> None:
        """create=False: a SQLite file that does not exist is an error (commands that only read or export must not
        leave an empty store behind a typo). A new SQLite file is made readable by its owner only (0600)."""
        self.url = database_url(str(db))
        if self.url.startswith("sqlite") and (path := _sqlite_file(self.url)) is not None:
            if path.is_dir():
                raise StoreError(f"database {path}: is a directory, not a SQLite file")
            if not path.exists():
                if not create:
                    raise StoreError(f"database {path}: no such store (create one with hhh label generate or "
                                     "hhh label import)", 404)
                if not path.parent.is_dir():
                    raise StoreError(f"database {path}: folder {path.parent} does not exist")
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite gives -wal and -shm the same mode
        try:
            if self.url.startswith("sqlite"):
                self.engine = _sqlite_engine(self.url, immediate=False)
                self.write_engine = _sqlite_engine(self.url, immediate=True)
            else:
                self.engine = self.write_engine = create_engine(self.url, pool_pre_ping=True)
        except ModuleNotFoundError as e:
            raise StoreError(f"database {masked_url(self.url)}: its driver {e.name!r} is not installed "
                             "(PostgreSQL: pip install 'psycopg[binary]')") from None
        except ArgumentError as e:
            raise StoreError(f"database {masked_url(str(db))}: {e}") from None
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        if migrate:
            from hhh.feedback.migrations import upgrade

            upgrade(self.url)

    @property
    def display_url(self) -> str:
        return masked_url(self.url)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction; committed (and on disk) when the block ends without an exception."""
        with self._write() as s, s.begin():
            yield s

    # --- prompts and completions ---------------------------------------------------------------

    def add_prompt(self, text: str, source: str | None = None, *, session: Session | None = None) -> int:
        """Id of the prompt with this text, added if new."""
        if session is None:
            with self.write() as s:
                return self.add_prompt(text, source, session=s)
        h = text_hash(text)
        found = session.scalar(select(Prompt.id).where(Prompt.text_hash == h))
        if found is not None:
            return found
        prompt = Prompt(text=text, text_hash=h, source=source)
        session.add(prompt)
        session.flush()
        return prompt.id

    def add_completion(self, prompt_id: int, text: str, *, model: str, adapter: str | None = None,
                       instruction: str | None = None, session: Session | None = None) -> int:
        """Id of this completion of the prompt, added if new (identical texts are one completion)."""
        if session is None:
            with self.write() as s:
                return self.add_completion(prompt_id, text, model=model, adapter=adapter, instruction=instruction,
                                           session=s)
        h = text_hash(text)
        found = session.scalar(select(Completion.id).where(Completion.prompt_id == prompt_id, Completion.text_hash == h))
        if found is not None:
            return found
        c = Completion(prompt_id=prompt_id, text=text, text_hash=h, model=model, adapter=adapter, instruction=instruction)
        session.add(c)
        session.flush()
        return c.id

    def items(self, *, min_completions: int = 2) -> list[dict[str, Any]]:
        """Every prompt with at least `min_completions` completions: {prompt_id, prompt, completions: [{id, text}]}."""
        with self.read() as s:
            prompts = s.scalars(select(Prompt).order_by(Prompt.id)).all()
            return [self._item(p) for p in prompts if len(p.completions) >= min_completions]

    @staticmethod
    def _item(p: Prompt) -> dict[str, Any]:
        return {"prompt_id": p.id, "prompt": p.text, "completions": [{"id": c.id, "text": c.text} for c in p.completions]}

    # --- labelers --------------------------------------------------------------------------------

    def add_labeler(self, name: str, *, role: str = "labeler", days: float | None = TOKEN_DAYS) -> str | None:
        """Create a labeler; returns their token (shown once: only its hash is stored), valid for `days` (None:
        no expiry). AI labelers have none."""
        if role not in ("labeler", "admin", "ai"):
            raise StoreError(f"role must be labeler, admin or ai, got {role!r}")
        name = _labeler_name(name)
        token = None if role == "ai" else secrets.token_urlsafe(24)
        try:
            with self.write() as s:
                s.add(Labeler(name=name, role=role, token_hash=text_hash(token) if token else None,
                              token_expires_at=_expiry(days) if token else None))
        except IntegrityError:
            raise StoreError(f"a labeler named {name!r} already exists", 409) from None
        return token

    def new_token(self, name: str, *, days: float | None = TOKEN_DAYS) -> str:
        """A fresh token for a labeler (after expiry, revocation or a leak); the old one stops working."""
        token = secrets.token_urlsafe(24)
        with self.write() as s:
            labeler = s.scalar(select(Labeler).where(Labeler.name == name))
            if labeler is None or labeler.role == "ai":
                raise StoreError(f"no human labeler named {name!r}", 404)
            labeler.token_hash, labeler.token_expires_at = text_hash(token), _expiry(days)
            s.execute(_table(LoginSession).delete().where(LoginSession.labeler_id == labeler.id))
        return token

    def revoke_labeler(self, name: str) -> int:
        """The labeler's token stops working and every browser session of theirs ends at once (their rankings
        stay); returns how many sessions were ended."""
        with self.write() as s:
            labeler = s.scalar(select(Labeler).where(Labeler.name == name))
            if labeler is None:
                raise StoreError(f"no labeler named {name!r}", 404)
            labeler.token_hash, labeler.token_expires_at = None, None
            done = s.execute(_table(LoginSession).delete().where(LoginSession.labeler_id == labeler.id))
            return cast(CursorResult, done).rowcount

    def start_session(self, labeler_id: int, *, hours: float = SESSION_HOURS) -> str:
        """A browser session for a logged-in labeler; returns its token (for the cookie; only its hash is kept)."""
        token = secrets.token_urlsafe(32)
        with self.write() as s:
            s.execute(_table(LoginSession).delete().where(LoginSession.expires_at < _now()))
            s.add(LoginSession(labeler_id=labeler_id, token_hash=text_hash(token),
                               expires_at=_now() + timedelta(hours=hours)))
        return token

    def labeler_for_session(self, token: str) -> Labeler | None:
        with self.read() as s:
            return s.scalar(select(Labeler).join(LoginSession, LoginSession.labeler_id == Labeler.id)
                            .where(LoginSession.token_hash == text_hash(token), LoginSession.expires_at > _now()))

    def end_session(self, token: str) -> None:
        with self.write() as s:
            s.execute(_table(LoginSession).delete().where(LoginSession.token_hash == text_hash(token)))

    def ai_labeler(self, name: str) -> int:
        with self.write() as s:
            found = s.scalar(select(Labeler).where(Labeler.name == name))
            if found is not None:
                if found.role != "ai":
                    raise StoreError(f"labeler {name!r} exists and is not an AI labeler")
                return found.id
            labeler = Labeler(name=name, role="ai")
            s.add(labeler)
            s.flush()
            return labeler.id

    def labeler_for_token(self, token: str) -> Labeler | None:
        """The labeler whose own (unexpired, unrevoked) token this is."""
        with self.read() as s:
            found = s.scalar(select(Labeler).where(Labeler.token_hash == text_hash(token)))
        if found is None or (found.token_expires_at is not None and found.token_expires_at <= _now()):
            return None
        return found

    def labeler_id(self, name: str) -> int:
        with self.read() as s:
            found = s.scalar(select(Labeler.id).where(Labeler.name == name))
        if found is None:
            raise StoreError(f"no labeler named {name!r}", 404)
        return found

    # --- rankings ----------------------------------------------------------------------------------

    def submit(self, labeler_id: int, prompt_id: int, tiers: Sequence[Sequence[int]], *, submission_id: str,
               unsafe: Sequence[int] = (), margin: float | None = None, edit: int | None = None,
               probability: float | None = None) -> int:
        """Save a ranking (or, with edit=RANKING_ID, replace the labeler's own) and its pairs; returns its id.

        Refused, changing nothing: an unknown prompt, a ranking that does not list each completion of the prompt
        exactly once, a submission id seen before, a second ranking of the same prompt by the same labeler.
        """
        if not submission_id or len(submission_id) > 64:
            raise StoreError("submission_id must be 1 to 64 characters")
        if probability is not None and not 0.5 <= probability <= 1:
            raise StoreError(f"probability must be in [0.5, 1] (the better completion's), got {probability}")
        # Everything that depends only on the request is checked before the write lock is taken: a bad or huge
        # ranking must not hold up another labeler's save.
        with self.read() as s:
            ids = self._completion_ids(s, prompt_id)
        checked, unsafe = self._check_ranking(prompt_id, tiers, unsafe, ids)
        try:
            with self.write() as s:
                now = self._completion_ids(s, prompt_id)
                if now != ids:  # completions were added meanwhile
                    checked, unsafe = self._check_ranking(prompt_id, tiers, unsafe, now)
                if s.scalar(select(Ranking.id).where(Ranking.submission_id == submission_id)) is not None:
                    raise StoreError(f"duplicate submission {submission_id!r}: it was already saved", 409)
                if edit is None:
                    ranking = Ranking(prompt_id=prompt_id, labeler_id=labeler_id, submission_id=submission_id,
                                      tiers=checked, unsafe=unsafe)
                    s.add(ranking)
                else:
                    found = s.get(Ranking, edit)
                    if found is None or found.labeler_id != labeler_id or found.prompt_id != prompt_id:
                        raise StoreError(f"you have no ranking {edit} of prompt {prompt_id}", 404)
                    ranking = found
                    ranking.tiers, ranking.unsafe = checked, unsafe
                    ranking.submission_id, ranking.revision, ranking.updated_at = submission_id, ranking.revision + 1, _now()
                    ranking.pairs.clear()
                self.add_pairs(s, ranking, margin=margin, probability=probability)
                s.execute(_table(Skip).delete().where(Skip.prompt_id == prompt_id, Skip.labeler_id == labeler_id))
                s.flush()
                return ranking.id
        except IntegrityError as e:
            # a concurrent request won the race for the same (prompt, labeler) or submission id
            if "submission_id" in str(e.orig):
                raise StoreError(f"duplicate submission {submission_id!r}: it was already saved", 409) from None
            raise StoreError(f"you already ranked prompt {prompt_id}; edit that ranking instead", 409) from None
        except ValueError as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(str(e)) from None

    @staticmethod
    def _completion_ids(session: Session, prompt_id: int) -> list[int]:
        if session.get(Prompt, prompt_id) is None:
            raise StoreError(f"no prompt with id {prompt_id}", 404)
        return list(session.scalars(select(Completion.id).where(Completion.prompt_id == prompt_id)
                                    .order_by(Completion.id)))

    @staticmethod
    def _check_ranking(prompt_id: int, tiers: Sequence[Sequence[int]], unsafe: Sequence[int],
                       ids: list[int]) -> tuple[list[list[int]], list[int]]:
        try:
            checked = check_tiers(tiers, ids)
        except RankingError as e:
            raise StoreError(str(e)) from None
        if len(unsafe) > len(ids) or not all(isinstance(c, int) and not isinstance(c, bool) for c in unsafe):
            raise StoreError(f"unsafe flags must be at most {len(ids)} completion ids of prompt {prompt_id}")
        bad = sorted(set(unsafe) - set(ids))
        if bad:
            raise StoreError(f"unsafe flags name completions {bad} that are not completions of prompt {prompt_id}")
        return checked, sorted(set(unsafe))

    @staticmethod
    def add_pairs(session: Session, ranking: Ranking, *, margin: float | None = None,
                  margins: dict[tuple[int, int], float] | None = None, probability: float | None = None,
                  probabilities: dict[tuple[int, int], float] | None = None) -> None:
        """The K(K-1)/2 pairs of a ranking's tiers; `margins` {(better, worse): m} overrides `margin` per pair;
        `probability` (a soft label) goes on every ordered pair, `probabilities` overrides it per pair."""
        ranking.pairs.extend(Pair(prompt_id=ranking.prompt_id, better_id=p.better, worse_id=p.worse, tie=p.tie,
                                  margin=(margins or {}).get((p.better, p.worse), margin),
                                  probability=None if p.tie else (probabilities or {}).get((p.better, p.worse),
                                                                                            probability))
                             for p in tiers_to_pairs(ranking.tiers))

    def skip(self, labeler_id: int, prompt_id: int) -> None:
        with self.write() as s:
            if s.get(Prompt, prompt_id) is None:
                raise StoreError(f"no prompt with id {prompt_id}", 404)
            done = s.scalar(select(Skip.id).where(Skip.prompt_id == prompt_id, Skip.labeler_id == labeler_id))
            if done is None:
                s.add(Skip(prompt_id=prompt_id, labeler_id=labeler_id))

    @staticmethod
    def _open_prompts(labeler_id: int, overlap: int):
        """Prompts this labeler may rank: not ranked or skipped by them, with >= 2 completions and fewer than
        `overlap` human rankings; least-ranked first, so that prompts reach `overlap` labels evenly."""
        counts = (select(Ranking.prompt_id, func.count(Ranking.id).label("n"))
                  .join(Labeler, Labeler.id == Ranking.labeler_id).where(Labeler.role != "ai")
                  .group_by(Ranking.prompt_id).subquery())
        ncomp = (select(Completion.prompt_id, func.count(Completion.id).label("k"))
                 .group_by(Completion.prompt_id).subquery())
        mine = select(Ranking.prompt_id).where(Ranking.labeler_id == labeler_id)
        skipped = select(Skip.prompt_id).where(Skip.labeler_id == labeler_id)
        n = func.coalesce(counts.c.n, 0)
        return (select(Prompt).join(ncomp, ncomp.c.prompt_id == Prompt.id)
                .outerjoin(counts, counts.c.prompt_id == Prompt.id)
                .where(ncomp.c.k >= 2, Prompt.id.not_in(mine), Prompt.id.not_in(skipped), n < overlap)
                .order_by(n, Prompt.id))

    def next_item(self, labeler_id: int, *, overlap: int = 2) -> dict[str, Any] | None:
        """The next prompt for this labeler (see `_open_prompts`), or None when there is nothing left."""
        with self.read() as s:
            prompt = s.scalar(self._open_prompts(labeler_id, overlap).limit(1))
            return None if prompt is None else self._item(prompt)

    def item(self, prompt_id: int) -> dict[str, Any]:
        with self.read() as s:
            prompt = s.get(Prompt, prompt_id)
            if prompt is None:
                raise StoreError(f"no prompt with id {prompt_id}", 404)
            return self._item(prompt)

    def progress(self, labeler_id: int, *, overlap: int = 2) -> dict[str, int]:
        with self.read() as s:
            ranked = s.scalar(select(func.count(Ranking.id)).where(Ranking.labeler_id == labeler_id)) or 0
            skipped = s.scalar(select(func.count(Skip.id)).where(Skip.labeler_id == labeler_id)) or 0
            remaining = s.scalar(select(func.count()).select_from(self._open_prompts(labeler_id, overlap).subquery()))
        return {"ranked": ranked, "skipped": skipped, "remaining": remaining or 0}

    def rankings(self, *, labeler_id: int | None = None) -> list[dict[str, Any]]:
        """Rankings (of one labeler, or all) with labeler name and role; oldest first."""
        with self.read() as s:
            q = select(Ranking, Labeler).join(Labeler, Labeler.id == Ranking.labeler_id).order_by(Ranking.id)
            if labeler_id is not None:
                q = q.where(Ranking.labeler_id == labeler_id)
            return [{"ranking_id": r.id, "prompt_id": r.prompt_id, "labeler": lab.name, "role": lab.role,
                     "tiers": r.tiers, "unsafe": r.unsafe, "revision": r.revision,
                     "updated_at": r.updated_at.isoformat()} for r, lab in s.execute(q)]

    def pairs(self, *, ties: bool = True, source: str = "all", labelers: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Preference pairs with texts: {prompt, chosen, rejected, tie, margin, labeler, source, ...}.

        source: "human" (labelers and admins), "ai", "served" (feedback on `hhh serve` answers, see
        served_pairs), or "all"; labelers: only these (by name), if given.
        """
        if source == "served":
            return [] if labelers and "served" not in labelers else self.served_pairs()
        with self.read() as s:
            q = (select(Pair, Ranking, Labeler).join(Ranking, Ranking.id == Pair.ranking_id)
                 .join(Labeler, Labeler.id == Ranking.labeler_id).order_by(Pair.id))
            if not ties:
                q = q.where(Pair.tie.is_(False))
            if source == "human":
                q = q.where(Labeler.role != "ai")
            elif source == "ai":
                q = q.where(Labeler.role == "ai")
            if labelers:
                q = q.where(Labeler.name.in_(list(labelers)))
            rows = s.execute(q).all()
            texts = dict(s.execute(select(Completion.id, Completion.text)).all())
            prompts = dict(s.execute(select(Prompt.id, Prompt.text)).all())
        labeled = [{"prompt": prompts[p.prompt_id], "chosen": texts[p.better_id], "rejected": texts[p.worse_id],
                    "tie": p.tie, "margin": p.margin, "probability": p.probability, "labeler": lab.name,
                    "source": "ai" if lab.role == "ai" else "human",
                    "prompt_id": p.prompt_id, "chosen_id": p.better_id, "rejected_id": p.worse_id}
                   for p, _r, lab in rows]
        if source == "all" and (not labelers or "served" in labelers):
            labeled += self.served_pairs()
        return labeled

    # --- served answers and their feedback (hhh serve) ----------------------------------------------

    def record_served(self, response_id: str, prompt: str | list[dict[str, str]], texts: Sequence[str], *,
                      model: str, adapter: str | None, served_as: str, user: str | None = None) -> list[int]:
        """Keep a served response: its prompt (a string, or a conversation kept as JSON), each choice's text as a
        completion, and which response id and choice it was. Returns the served rows' ids."""
        import json

        text, source = (prompt, "served") if isinstance(prompt, str) else (json.dumps(prompt), SERVED_CHAT)
        for attempt in range(2):
            try:
                with self.write() as s:
                    prompt_id = self.add_prompt(text, source, session=s)
                    rows = []
                    for choice, answer in enumerate(texts):
                        completion = self.add_completion(prompt_id, answer, model=model, adapter=adapter, session=s)
                        row = Served(response_id=response_id, choice=choice, prompt_id=prompt_id,
                                     completion_id=completion, served_as=served_as, user=user)
                        s.add(row)
                        rows.append(row)
                    s.flush()
                    return [r.id for r in rows]
            except IntegrityError:
                if attempt:  # a concurrent writer added the same prompt or completion first: once more sees it
                    raise StoreError(f"response {response_id!r} could not be recorded (conflict)", 409) from None
        raise AssertionError("unreachable")

    def add_served_feedback(self, response_id: str, kind: str, value: Any, *, choice: int = 0,
                            feedback_id: str | None = None) -> dict[str, Any]:
        """Store one judgement of a served response (see ServedFeedback); refused with a StoreError, changing
        nothing: an unknown response or choice, a value of the wrong kind, a feedback id seen before."""
        if kind not in FEEDBACK_KINDS:
            raise StoreError(f"feedback kind must be one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}")
        if kind == "thumbs" and value not in (1, -1):
            raise StoreError("thumbs must be 1 (up) or -1 (down)")
        if kind == "rating" and (isinstance(value, bool) or value not in (1, 2, 3, 4, 5)):
            raise StoreError("rating must be an integer from 1 to 5")
        if kind == "edit" and (not isinstance(value, str) or not value.strip()):
            raise StoreError("an edit must be a non-empty text")
        if kind == "preferred":
            choice = value
        feedback_id = feedback_id or secrets.token_hex(16)
        with self.read() as s:  # everything that only reads is settled before the write lock
            served = s.scalar(select(Served).where(Served.response_id == response_id, Served.choice == choice))
            if served is None:
                known = s.scalar(select(func.count()).select_from(Served).where(Served.response_id == response_id))
                raise StoreError(f"no served response {response_id!r}" if not known else
                                 f"response {response_id!r} has no choice {choice} (it has {known})", 404)
        try:
            with self.write() as s:
                if s.scalar(select(ServedFeedback.id).where(ServedFeedback.feedback_id == feedback_id)) is not None:
                    raise StoreError(f"duplicate feedback {feedback_id!r}: it was already saved", 409)
                edit = None
                if kind == "edit":
                    edit = self.add_completion(served.prompt_id, value.strip(), model="edit", session=s)
                row = ServedFeedback(feedback_id=feedback_id, served_id=served.id, kind=kind, edit_completion_id=edit,
                                     value=float(value) if kind in ("thumbs", "rating") else None)
                s.add(row)
                s.flush()
                return {"id": row.id, "feedback_id": feedback_id, "response_id": response_id, "choice": choice,
                        "kind": kind}
        except IntegrityError:
            raise StoreError(f"duplicate feedback {feedback_id!r}: it was already saved", 409) from None

    def served_feedback(self) -> list[dict[str, Any]]:
        """Every feedback row with its response id, choice and completion; oldest first."""
        with self.read() as s:
            q = (select(ServedFeedback, Served).join(Served, Served.id == ServedFeedback.served_id)
                 .order_by(ServedFeedback.id))
            return [{"feedback_id": f.feedback_id, "response_id": r.response_id, "choice": r.choice,
                     "kind": f.kind, "value": f.value, "completion_id": r.completion_id, "prompt_id": r.prompt_id,
                     "edit_completion_id": f.edit_completion_id, "served_as": r.served_as}
                    for f, r in s.execute(q)]

    def served_pairs(self) -> list[dict[str, Any]]:
        """Preference pairs implied by served feedback, in the shape of `pairs` (source "served"):
        within a prompt, every thumbed-up answer over every thumbed-down one (answers with both are left out) and
        a higher mean rating over a lower one (margin: the difference); the preferred choice over the response's
        other choices; an edit over the answer it edits."""
        import json
        from collections import defaultdict

        feedback = self.served_feedback()
        with self.read() as s:
            responses: dict[str, list[int]] = defaultdict(list)
            wanted = {f["response_id"] for f in feedback if f["kind"] == "preferred"}
            if wanted:
                for r in s.scalars(select(Served).where(Served.response_id.in_(wanted)).order_by(Served.choice)):
                    responses[r.response_id].append(r.completion_id)
            texts = dict(s.execute(select(Completion.id, Completion.text)).all())
            prompts = {i: (json.loads(t) if src == SERVED_CHAT else t)
                       for i, t, src in s.execute(select(Prompt.id, Prompt.text, Prompt.source))}
        thumbs: dict[int, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))
        ratings: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        found: dict[tuple[int, int], tuple[int, float | None]] = {}  # (better, worse) -> (prompt, margin)

        def add(prompt_id: int, better: int, worse: int, margin: float | None = None) -> None:
            if better != worse and (better, worse) not in found:
                found[(better, worse)] = (prompt_id, margin)

        for f in feedback:
            if f["kind"] == "thumbs":
                thumbs[f["prompt_id"]][f["completion_id"]].add(f["value"])
            elif f["kind"] == "rating":
                ratings[f["prompt_id"]][f["completion_id"]].append(f["value"])
            elif f["kind"] == "preferred":
                for other in responses[f["response_id"]]:
                    add(f["prompt_id"], f["completion_id"], other)
            else:
                add(f["prompt_id"], f["edit_completion_id"], f["completion_id"])
        for prompt_id, marks in thumbs.items():
            ups = [c for c, v in marks.items() if v == {1.0}]
            downs = [c for c, v in marks.items() if v == {-1.0}]
            for up in ups:
                for down in downs:
                    add(prompt_id, up, down)
        for prompt_id, given in ratings.items():
            means = {c: sum(v) / len(v) for c, v in given.items()}
            for a, ma in means.items():
                for b, mb in means.items():
                    if ma > mb:
                        add(prompt_id, a, b, ma - mb)
        return [{"prompt": prompts[p], "chosen": texts[b], "rejected": texts[w], "tie": False, "margin": m,
                 "probability": None, "labeler": "served", "source": "served", "prompt_id": p, "chosen_id": b,
                 "rejected_id": w} for (b, w), (p, m) in found.items()]

    def counts(self) -> dict[str, int]:
        with self.read() as s:
            return {name: s.scalar(select(func.count()).select_from(table)) or 0
                    for name, table in (("prompts", Prompt), ("completions", Completion), ("labelers", Labeler),
                                        ("rankings", Ranking), ("pairs", Pair), ("skips", Skip),
                                        ("served", Served), ("served_feedback", ServedFeedback))}
