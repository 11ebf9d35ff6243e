"""d2f-serve: an OpenAI-compatible HTTP server on the D2F engine (``pip install d2f_ext[serve]``).

``engine_loop`` owns the engine on one thread, ``protocol`` holds the request and response shapes,
``detokenize`` turns final tokens into text deltas, ``app`` the FastAPI routes, ``cli`` the command.
"""
