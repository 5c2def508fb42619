from __future__ import annotations


def test_paths_example(http, auth_headers, stack):
    r = http.get("/api/gallery/device123/paths", headers=auth_headers())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "success": True,
        "paths": {
            "incoming": str(stack.data_dir / "gallery" / "device123" / "incoming"),
            "thumbnails": str(stack.data_dir / "gallery" / "device123" / "thumbnails"),
        },
    }
    assert (stack.data_dir / "gallery" / "device123" / "incoming").is_dir()
