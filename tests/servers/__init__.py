"""Small ASGI apps that tests run in real server processes (uvicorn subprocesses)."""
