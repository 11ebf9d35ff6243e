"""d2f-serve: an OpenAI-compatible HTTP server on the D2F engine (``pip install d2f_ext[serve]``).

``engine_loop`` owns the engine on one thread, ``protocol`` holds the request and response shapes,
``params`` turns a request into decoding settings, ``detokenize`` and ``outputs`` turn final tokens
into text deltas and usage, ``errors`` gives OpenAI's error bodies, ``app`` the FastAPI routes,
``server`` builds the app and runs it in the background, ``cli`` the command.
"""
