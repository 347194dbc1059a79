import httpx

from tests.conftest import SESSION, TOKEN


def test_smoke(standin, proxy):
    body = standin.add("session", SESSION, "arr_000001", size=500_000)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{proxy.url}/v1/artifacts?object_id=arr_000001&session_id={SESSION}"
    r1 = httpx.get(url, headers=auth)
    assert r1.status_code == 200, r1.text
    assert r1.content == body
    print(r1.headers)
    r2 = httpx.get(url, headers=auth)
    assert r2.content == body
    print(r2.headers)
    assert standin.hits("session", SESSION, "arr_000001") == 1
