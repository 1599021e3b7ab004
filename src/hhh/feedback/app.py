"""The labeling web app (`hhh label serve`): server-rendered pages for people, a JSON API for scripts.

Pages: /  (log in with a token)  /label  (rank the next prompt's completions)  /label/{prompt_id}  (rank or
edit one)  /mine  (your rankings)  /admin  (agreement, progress, exports; admin token).
API (token in a cookie or `Authorization: Bearer`): GET /api/next, POST /api/rankings, PUT /api/rankings/{id},
GET /api/rankings, POST /api/skip, GET /api/progress, GET /api/admin/agreement, GET /api/admin/export.

A ranking is saved in one committed transaction before the page or the API says so. Every submission carries a
`submission_id` (the page makes one per view): a resend is refused with 409 and changes nothing.
"""


import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from hhh.feedback.agreement import agreement
from hhh.feedback.io import export_lines
from hhh.feedback.rankings import tiers_from_ranks
from hhh.feedback.store import Labeler, Store, StoreError

HERE = Path(__file__).resolve().parent
DEFAULT_GUIDELINE = HERE / "guideline.md"
COOKIE = "hhh_token"


class RankingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_id: int = Field(description="prompt whose completions are ranked")
    submission_id: str = Field(min_length=1, max_length=64, description="client-made id; a resend is refused")
    ranking: list[list[int]] = Field(description="tiers of completion ids, best first; one tier = a tie")
    unsafe: list[int] = Field([], description="completion ids flagged unsafe")


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_id: int


def _one_line(err: RequestValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"field {where!r}: {e['msg']}{more}"


def create_app(db: str | Store, *, guideline: str | Path | None = None, overlap: int = 2) -> FastAPI:
    store = db if isinstance(db, Store) else Store(db)
    guideline_path = Path(guideline) if guideline else DEFAULT_GUIDELINE
    if not guideline_path.is_file():
        raise FileNotFoundError(f"guideline file {guideline_path} not found")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app = FastAPI(title="hhh labeling", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.store = store

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _one_line(err)}, status_code=422)

    @app.exception_handler(StoreError)
    async def _refused(request: Request, err: StoreError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    def labeler_or_none(request: Request) -> Labeler | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        return store.labeler_for_token(token) if token else None

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
    def login(request: Request, token: Annotated[str, Form()]) -> Response:
        who = store.labeler_for_token(token.strip())
        if who is None:
            return page(request, "login.html", 401, error="unknown token")
        response = RedirectResponse("/admin" if who.role == "admin" else "/label", status_code=303)
        response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict")
        return response

    @app.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/label", response_class=HTMLResponse)
    def next_page(request: Request, who: Annotated[Labeler, Depends(labeler)], saved: int | None = None) -> Response:
        return label_page(request, who, store.next_item(who.id, overlap=overlap), saved=saved)

    @app.get("/label/{prompt_id}", response_class=HTMLResponse)
    def item_page(request: Request, prompt_id: int, who: Annotated[Labeler, Depends(labeler)]) -> Response:
        item = store.item(prompt_id)
        mine = [r for r in store.rankings(labeler_id=who.id) if r["prompt_id"] == prompt_id]
        if not mine:
            return label_page(request, who, item)
        ranks = {c: i + 1 for i, tier in enumerate(mine[0]["tiers"]) for c in tier}
        return label_page(request, who, item, ranks=ranks, unsafe=mine[0]["unsafe"], edit=mine[0]["ranking_id"])

    @app.post("/label", response_class=HTMLResponse)
    async def submit_form(request: Request, who: Annotated[Labeler, Depends(labeler)]) -> Response:
        form = await request.form()
        def integer(name: str) -> int | None:
            value = str(form.get(name, "") or "").strip()
            if not value:
                return None
            if not value.isdigit():
                raise StoreError(f"field {name!r} must be an integer")
            return int(value)

        prompt_id, edit = integer("prompt_id"), integer("edit")
        if prompt_id is None:
            raise StoreError("field 'prompt_id' is required")
        item = store.item(prompt_id)
        ranks: dict[int, int] = {}
        for c in item["completions"]:
            value = str(form.get(f"rank_{c['id']}", "")).strip()
            if value.isdigit() and int(value) > 0:
                ranks[c["id"]] = int(value)
        unsafe = [int(str(v)) for v in form.getlist("unsafe") if str(v).isdigit()]
        try:
            if len(ranks) < len(item["completions"]):
                raise StoreError(f"give every completion a rank ({len(ranks)} of {len(item['completions'])} ranked)")
            ranking_id = store.submit(who.id, prompt_id, tiers_from_ranks(ranks), unsafe=unsafe, edit=edit,
                                      submission_id=str(form.get("submission_id", "")))
        except StoreError as e:
            return label_page(request, who, item, status=e.status, error=str(e), ranks=ranks, unsafe=unsafe, edit=edit)
        return RedirectResponse(f"/label?saved={ranking_id}", status_code=303)

    @app.post("/skip")
    def skip_form(prompt_id: Annotated[int, Form()], who: Annotated[Labeler, Depends(labeler)]) -> Response:
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
    def api_edit(ranking_id: int, body: RankingIn, who: Annotated[Labeler, Depends(labeler)]) -> dict[str, int]:
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
    print(f"hhh label serve: http://{host}:{port}/  (store: {app.state.store.url})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
