"""The labeling web app (`hhh label serve`): server-rendered pages for people, a JSON API for scripts.

Pages: /  (log in with a token)  /label  (rank the next prompt's completions)  /label/{prompt_id}  (rank or
edit one)  /mine  (your rankings)  /admin  (agreement, progress, exports; admin token).
API (token in a cookie or `Authorization: Bearer`): GET /api/next, POST /api/rankings, PUT /api/rankings/{id},
GET /api/rankings, POST /api/skip, GET /api/progress, GET /api/admin/agreement, GET /api/admin/export.

A ranking is saved in one committed transaction before the page or the API says so. Every submission carries a
`submission_id` (the page makes one per view): a resend is refused with 409 and changes nothing.
"""


import ipaddress
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from hhh.config import SESSION_HOURS
from hhh.feedback.agreement import agreement
from hhh.feedback.io import export_lines
from hhh.feedback.rankings import tiers_from_ranks
from hhh.feedback.store import Labeler, Store, StoreError

HERE = Path(__file__).resolve().parent
DEFAULT_GUIDELINE = HERE / "guideline.md"
COOKIE = "hhh_token"


# Limits checked at the edge, before any lock or transaction. Ids are database integers: PostgreSQL's INTEGER
# holds at most 2^31 - 1 (SQLite's 2^63 - 1); a larger number is a 422, not a driver overflow.
ID_MAX = 2**31 - 1
MAX_COMPLETIONS = 256  # per prompt, far above any K a person can rank
MAX_BODY = 64 * 1024  # bytes of one request body (a full ranking of 256 ids is ~3 KB)
DbId = Annotated[int, Field(ge=1, le=ID_MAX)]


class RankingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_id: DbId = Field(description="prompt whose completions are ranked")
    submission_id: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$",
                               description="client-made id (printable ASCII); a resend is refused")
    ranking: list[Annotated[list[DbId], Field(min_length=1, max_length=MAX_COMPLETIONS)]] = Field(
        min_length=1, max_length=MAX_COMPLETIONS, description="tiers of completion ids, best first; one tier = a tie")
    unsafe: list[DbId] = Field([], max_length=MAX_COMPLETIONS, description="completion ids flagged unsafe")


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_id: DbId


def form_id(value: object, name: str) -> int | None:
    """An id from a form field: ASCII digits only ('²'.isdigit() is True, int('²') fails) and within ID_MAX."""
    text = str(value or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or not 0 < int(text) <= ID_MAX:
        raise StoreError(f"field {name!r} must be an integer from 1 to {ID_MAX}")
    return int(text)


class EdgeGuard:
    """Pure ASGI middleware, before any route: refuses bodies over MAX_BODY bytes (413) however they are sent, and
    state-changing requests authenticated by the cookie that come from another origin (403). SameSite cookies do
    not help here: another app on 127.0.0.1 at another port is same-site. A Bearer token is no ambient credential,
    so API calls that carry one are not checked for origin."""

    def __init__(self, app, *, max_body: int = MAX_BODY, check_origin: bool = True,
                 error_body: Callable[[int, str], dict] = lambda status, message: {"error": message}) -> None:
        self.app, self.max_body, self.check_origin, self.error_body = app, max_body, check_origin, error_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = self.max_body

        async def refuse(status: int, message: str) -> None:
            await _refuse(send, status, self.error_body(status, message))

        if not headers.get("content-length", "0").isdigit() or int(headers.get("content-length", "0")) > limit:
            return await refuse(413, f"request body over {limit} bytes")
        if self.check_origin and scope["method"] in ("POST", "PUT", "PATCH", "DELETE") and \
                not headers.get("authorization", "").lower().startswith("bearer "):
            origin = headers.get("origin") or _origin_of(headers.get("referer", ""))
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
            if origin != own:
                return await refuse(403, f"cross-origin form post refused (origin {origin or 'missing'!r}, "
                                         f"expected {own!r})")
        seen, refused = 0, False

        async def limited_receive():
            # A chunked body carries no content-length: count it as it arrives; past the limit answer 413 at once
            # and tell the app the client went away, so that it stops reading and nothing reaches the store.
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit and not refused:
                refused = True
                await refuse(413, f"request body over {limit} bytes")
            return {"type": "http.disconnect"} if refused else message

        async def app_send(message):
            if not refused:  # after our 413 the app's own answer has nowhere to go
                await send(message)

        await self.app(scope, limited_receive, app_send)


def _origin_of(url: str) -> str | None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


async def _refuse(send, status: int, error: dict) -> None:
    body = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def invalid_field(err: RequestValidationError) -> tuple[str, str]:
    """(the first invalid field's dotted path, a one-line message naming it) of a refused request body."""
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return where, f"field {where!r}: {e['msg']}{more}"


def create_app(db: str | Store, *, guideline: str | Path | None = None, overlap: int = 2) -> FastAPI:
    store = db if isinstance(db, Store) else Store(db)
    guideline_path = Path(guideline) if guideline else DEFAULT_GUIDELINE
    if not guideline_path.is_file():
        raise FileNotFoundError(f"guideline file {guideline_path} not found")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app = FastAPI(title="hhh labeling", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(EdgeGuard)
    app.state.store = store

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": invalid_field(err)[1]}, status_code=422)

    @app.exception_handler(StoreError)
    async def _refused(request: Request, err: StoreError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    def labeler_or_none(request: Request) -> Labeler | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return store.labeler_for_token(auth[7:].strip())
        session = request.cookies.get(COOKIE)
        return store.labeler_for_session(session) if session else None

    def labeler(request: Request) -> Labeler:
        found = labeler_or_none(request)
        if found is None:
            raise HTTPException(401, "log in with your labeler token (cookie or 'Authorization: Bearer TOKEN')")
        return found

    def admin(who: Annotated[Labeler, Depends(labeler)]) -> Labeler:
        if who.role != "admin":
            raise HTTPException(403, "admin token required")
        return who

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> Response:
        if err.status_code == 401 and not request.url.path.startswith("/api/"):
            return RedirectResponse("/", status_code=303)
        return JSONResponse({"error": err.detail}, status_code=err.status_code)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def label_page(request: Request, who: Labeler, item: dict | None, *, status: int = 200, error: str | None = None,
                   saved: int | None = None, ranks: dict[int, int] | None = None, unsafe: list[int] | None = None,
                   edit: int | None = None) -> HTMLResponse:
        return page(request, "label.html", status, who=who, item=item, error=error, saved=saved, edit=edit,
                    ranks=ranks or {}, unsafe=set(unsafe or []), submission_id=uuid.uuid4().hex,
                    guideline=guideline_path.read_text(), progress=store.progress(who.id, overlap=overlap))

    # --- pages ---------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        who = labeler_or_none(request)
        if who is not None:
            return RedirectResponse("/admin" if who.role == "admin" else "/label", status_code=303)
        return page(request, "login.html")

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form(max_length=200)]) -> Response:
        who = store.labeler_for_token(token.strip())
        if who is None:
            return page(request, "login.html", 401, error="unknown or expired token")
        response = RedirectResponse("/admin" if who.role == "admin" else "/label", status_code=303)
        # The cookie holds a session of its own (expires, ends at logout), never the labeler's token.
        response.set_cookie(COOKIE, store.start_session(who.id), httponly=True, samesite="strict",
                            max_age=int(SESSION_HOURS * 3600), secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        if session := request.cookies.get(COOKIE):
            store.end_session(session)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/label", response_class=HTMLResponse)
    def next_page(request: Request, who: Annotated[Labeler, Depends(labeler)], saved: int | None = None) -> Response:
        return label_page(request, who, store.next_item(who.id, overlap=overlap), saved=saved)

    @app.get("/label/{prompt_id}", response_class=HTMLResponse)
    def item_page(request: Request, prompt_id: Annotated[int, PathParam(ge=1, le=ID_MAX)],
                  who: Annotated[Labeler, Depends(labeler)]) -> Response:
        item = store.item(prompt_id)
        mine = [r for r in store.rankings(labeler_id=who.id) if r["prompt_id"] == prompt_id]
        if not mine:
            return label_page(request, who, item)
        ranks = {c: i + 1 for i, tier in enumerate(mine[0]["tiers"]) for c in tier}
        return label_page(request, who, item, ranks=ranks, unsafe=mine[0]["unsafe"], edit=mine[0]["ranking_id"])

    @app.post("/label", response_class=HTMLResponse)
    async def submit_form(request: Request, who: Annotated[Labeler, Depends(labeler)]) -> Response:
        form = await request.form(max_fields=4 * MAX_COMPLETIONS)
        prompt_id, edit = form_id(form.get("prompt_id"), "prompt_id"), form_id(form.get("edit"), "edit")
        if prompt_id is None:
            raise StoreError("field 'prompt_id' is required")
        item = store.item(prompt_id)
        ranks: dict[int, int] = {}
        for c in item["completions"]:
            rank = form_id(form.get(f"rank_{c['id']}"), f"rank_{c['id']}")
            if rank is not None:
                ranks[c["id"]] = rank
        given = [form_id(v, "unsafe") for v in form.getlist("unsafe")[:MAX_COMPLETIONS]]
        unsafe = [u for u in given if u is not None]
        try:
            if len(ranks) < len(item["completions"]):
                raise StoreError(f"give every completion a rank ({len(ranks)} of {len(item['completions'])} ranked)")
            ranking_id = store.submit(who.id, prompt_id, tiers_from_ranks(ranks), unsafe=unsafe, edit=edit,
                                      submission_id=str(form.get("submission_id", "")))
        except StoreError as e:
            return label_page(request, who, item, status=e.status, error=str(e), ranks=ranks, unsafe=unsafe, edit=edit)
        return RedirectResponse(f"/label?saved={ranking_id}", status_code=303)

    @app.post("/skip")
    def skip_form(prompt_id: Annotated[int, Form(ge=1, le=ID_MAX)], who: Annotated[Labeler, Depends(labeler)]) -> Response:
        store.skip(who.id, prompt_id)
        return RedirectResponse("/label", status_code=303)

    @app.get("/mine", response_class=HTMLResponse)
    def mine_page(request: Request, who: Annotated[Labeler, Depends(labeler)]) -> Response:
        prompts = {it["prompt_id"]: it["prompt"] for it in store.items(min_completions=1)}
        return page(request, "mine.html", who=who, rankings=store.rankings(labeler_id=who.id), prompts=prompts)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, who: Annotated[Labeler, Depends(admin)]) -> Response:
        rankings = store.rankings()
        per_labeler: dict[str, int] = {}
        for r in rankings:
            per_labeler[r["labeler"]] = per_labeler.get(r["labeler"], 0) + 1
        return page(request, "admin.html", who=who, stats=agreement(rankings), counts=store.counts(),
                    per_labeler=per_labeler)

    # --- JSON API ------------------------------------------------------------------------------------

    @app.get("/api/next")
    def api_next(who: Annotated[Labeler, Depends(labeler)]) -> Response:
        item = store.next_item(who.id, overlap=overlap)
        return Response(status_code=204) if item is None else JSONResponse(item)

    @app.post("/api/rankings", status_code=201)
    def api_submit(body: RankingIn, who: Annotated[Labeler, Depends(labeler)]) -> dict[str, int]:
        rid = store.submit(who.id, body.prompt_id, body.ranking, unsafe=body.unsafe, submission_id=body.submission_id)
        return {"ranking_id": rid}

    @app.put("/api/rankings/{ranking_id}")
    def api_edit(ranking_id: Annotated[int, PathParam(ge=1, le=ID_MAX)], body: RankingIn,
                 who: Annotated[Labeler, Depends(labeler)]) -> dict[str, int]:
        rid = store.submit(who.id, body.prompt_id, body.ranking, unsafe=body.unsafe, submission_id=body.submission_id,
                           edit=ranking_id)
        return {"ranking_id": rid}

    @app.get("/api/rankings")
    def api_mine(who: Annotated[Labeler, Depends(labeler)]) -> list[dict[str, Any]]:
        return store.rankings(labeler_id=who.id)

    @app.post("/api/skip", status_code=204)
    def api_skip(body: SkipIn, who: Annotated[Labeler, Depends(labeler)]) -> Response:
        store.skip(who.id, body.prompt_id)
        return Response(status_code=204)

    @app.get("/api/progress")
    def api_progress(who: Annotated[Labeler, Depends(labeler)]) -> dict[str, int]:
        return store.progress(who.id, overlap=overlap)

    @app.get("/api/admin/agreement")
    def api_agreement(who: Annotated[Labeler, Depends(admin)]) -> dict[str, Any]:
        return agreement(store.rankings())

    @app.get("/api/admin/export")
    def api_export(who: Annotated[Labeler, Depends(admin)], format: str = "pairs", ties: bool = False,
                   source: str = "all") -> Response:
        if format not in ("pairs", "rankings") or source not in ("all", "human", "ai"):
            raise StoreError("format must be pairs or rankings; source all, human or ai")
        lines = list(export_lines(store, format, ties=ties, source=source))
        return StreamingResponse(iter(lines), media_type="application/jsonl",
                                 headers={"content-disposition": f'attachment; filename="{format}.jsonl"'})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(db: str, *, host: str = "127.0.0.1", port: int = 8000, guideline: str | None = None, overlap: int = 2) -> None:
    import uvicorn

    app = create_app(db, guideline=guideline, overlap=overlap)
    print(f"hhh label serve: http://{host}:{port}/  (store: {app.state.store.display_url})", flush=True)
    if not is_loopback(host):
        print(f"warning: serving plain HTTP on {host}, reachable from other machines: tokens and rankings cross the "
              "network unencrypted. Put a TLS proxy in front (see README, 'Serving beyond this machine') or use "
              "--host 127.0.0.1.", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
