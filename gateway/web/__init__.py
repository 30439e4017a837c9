"""The web layer: the aiohttp app (``app.create_app``), its routes under /api and the pages, request
validation, paging, rate limits, the error envelope and metrics. It asks the engine to act and reads the
store; nothing below it imports it."""
