from __future__ import annotations

from devicegate import DeviceAuthMiddleware
from tests.helpers import Keys, RecordingApp, client


async def test_api_key_admits(keys: Keys, app: RecordingApp) -> None:
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        response = await http.get("/", headers={"x-api-key": keys.api_key})
    assert response.status_code == 200
    assert response.json()["kind"] == "api_key"
    assert app.ran
