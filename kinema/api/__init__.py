"""`kinema serve`: an HTTP API for generation with durable jobs (FastAPI + uvicorn, jobs in SQLite).

    store.py   JobStore: the jobs table (stdlib sqlite3, WAL) under the data folder; survives restarts
    worker.py  JobWorker: one thread that runs queued jobs in turn through kinema.pipelines.jobs.run_job
    app.py     create_app(): the FastAPI app (routes, errors as one-line JSON, the API key check, upload limits)

Nothing here is imported by `kinema --help`; FastAPI and torch load only when the server starts. See docs/api.md.
"""
