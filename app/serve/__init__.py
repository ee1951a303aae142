"""`crofter serve`: the OpenAI-compatible HTTP server.

The server only translates: an HTTP request becomes a `turn.run_turn` (or a completion, a
scoring job, an embedding), and the turn's events become OpenAI JSON or SSE chunks.

    app.py          the FastAPI app factory: routes, ASGI middleware (auth, slashes, logging)
    options.py      what the server was started with
    errors.py       ApiError and OpenAI's error shape
    requests.py     the request bodies (pydantic), read with a size cap
    pool.py         one engine per model, loaded on first use, LRU, a FIFO line per model
    jobs.py         blocking work on a thread, its events handed to the event loop; disconnects
    chat.py         /v1/chat/completions: messages -> a turn, events -> JSON and chunks
    client_tools.py the client's function specs as tools the turn can constrain to
    completions.py  /v1/completions: raw prompts, echo, logprobs (prompt scoring)
    embeddings.py   /v1/embeddings: the documents' embedder
"""
