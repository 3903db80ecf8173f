"""The HTTP server: `rmserve serve --model M`. FastAPI + uvicorn over an AsyncEngine.

app.py      routes, validation, errors, API key, body-size limit
schemas.py  typed request/response bodies (the OpenAPI schema)
pooling.py  vLLM's /classify and SGLang's /v1/embeddings shapes (RL trainers' reward clients)
metrics.py  Prometheus metrics
main.py     the `serve` subcommand: load the model, build the app, run uvicorn
"""
