"""``inkwash serve``: a web page and the Stable Diffusion WebUI's HTTP API over inkwash's pipeline.

``config`` holds the server's options, ``webui`` translates the WebUI's names and formats (samplers,
schedule types, infotexts, masks), ``models`` lists and loads the models on offer, ``worker`` runs the
one model thread behind a bounded queue, and ``app`` is the FastAPI application with its routes.
"""
