"""papscan's REST API: the worklist, one scan, its cells and their images, the queue.

`create_app(db)` builds the FastAPI app; `papscan serve` runs it with uvicorn. Every
route needs `Authorization: Bearer <token>` (`papscan token create NAME`).
"""

from worker.api.app import create_app

__all__ = ["create_app"]
