"""The FastAPI app: bearer-token auth on every route, errors as one JSON sentence.

`/docs` and `/redoc` are off (FastAPI's pages load their scripts from a CDN); the
OpenAPI schema is at `/openapi.json`, behind the token like everything else. No CORS
middleware: browsers on other origins are refused by default.

The review page (`/review/`) is static HTML, CSS and JavaScript shipped in the package
and holds no patient data: it asks for a token, keeps it in the tab's session storage and
sends it as a bearer token with every API call, so the page's data is guarded by the same
check as any other client's (and, with no cookies, cross-site requests carry nothing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.api.tokens import token_is_valid
from worker.db.session import Database
from worker.errors import DatabaseUnavailableError

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="A token from `papscan token create`.")


class Unauthorized(Exception):
    """No token, or not a valid one."""


def create_app(db: Database, *, broker_url: str | None = None) -> FastAPI:
    """Build the API over `db`; `broker_url` (default: settings) feeds `/api/queue`."""
    from worker.api.explain import router as why_router
    from worker.api.reviews import router as review_router
    from worker.api.routes import router
    from worker.api.slide_files import OpenSlides
    from worker.api.tiles import TileCache
    from worker.api.tiles import router as tile_router

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized()
        with db.session() as s:
            if not token_is_valid(s, credentials.credentials):
                raise Unauthorized()

    app = FastAPI(
        title="papscan",
        summary="Cervical cytology screening results: worklist, scans, cells, queue.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(require_token)],
        responses={401: {"model": _error_model(), "description": "No or a wrong token."}},
    )
    app.state.db = db
    app.state.broker_url = broker_url
    app.state.open_slides = OpenSlides()
    app.state.tile_cache = TileCache()
    app.include_router(router)
    app.include_router(review_router)
    app.include_router(tile_router)
    app.include_router(why_router)
    _serve_review_page(app)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    _handle_errors(app)
    return app


REVIEW_PAGE = Path(__file__).with_name("review")

#: Only this origin's scripts, styles and images (tiles and crops arrive as blobs).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _serve_review_page(app: FastAPI) -> None:
    """`/review/` serves the page's files; `/` leads there. Mounted and added as plain
    routes, so the token dependency does not apply: the files are the same for everyone."""
    app.mount("/review", StaticFiles(directory=REVIEW_PAGE, html=True), name="review")
    app.router.add_route("/", lambda request: RedirectResponse("/review/"), include_in_schema=False)

    @app.middleware("http")
    async def page_headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/review"):
            response.headers.update(_PAGE_HEADERS)
        return response


def _error_model() -> type:
    from worker.api.schemas import Error

    return Error


def _handle_errors(app: FastAPI) -> None:
    """Every error as `{"detail": "<one sentence>"}`."""

    @app.exception_handler(Unauthorized)
    def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": "A valid bearer token is needed (papscan token create NAME)."},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "The request failed."
        if exc.status_code == 404 and detail == "Not Found":
            detail = "There is nothing at this address."
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = " ".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "is not valid")).rstrip(".")
        return JSONResponse({"detail": f"{where}: {message}."}, status_code=422)

    @app.exception_handler(DatabaseUnavailableError)
    def database_down(request: Request, exc: DatabaseUnavailableError) -> JSONResponse:
        logger.error("%s", exc)
        return JSONResponse(
            {"detail": "The results database cannot be reached just now."}, status_code=503
        )

    @app.exception_handler(Exception)
    def bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal server error."}, status_code=500)
