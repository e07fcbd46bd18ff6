"""The HTTP edge: an ASGI app that turns authenticated requests into acknowledged intents."""
