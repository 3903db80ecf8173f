"""The HTTP server: `rmserve serve --model M`. FastAPI + uvicorn over an AsyncEngine.

app.py      routes, validation, errors, API key, body-size limit
schemas.py  typed request/response bodies (the OpenAPI schema)
metrics.py  Prometheus metrics
main.py     the `serve` subcommand: load the model, build the app, run uvicorn
"""
