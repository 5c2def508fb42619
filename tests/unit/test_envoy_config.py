"""The rendered Envoy configuration, checked by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from gallery_server import envoy_config, supervisor


@pytest.mark.parametrize("media_root", [
    None,
    pathlib.Path("/srv/gallery data/media"),
    # Quotes, backslashes and characters beyond the BMP must stay one YAML string.
    pathlib.Path('/srv/dåta "1" \\ 😀/media'),
], ids=["handoff off", "plain", "awkward"])
def test_envoy_accepts_the_rendered_configuration(tmp_path: pathlib.Path, media_root: pathlib.Path | None) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(envoy_config.render(
        listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"], media_root=media_root
    ), encoding="utf-8")
    result = subprocess.run([supervisor.envoy_binary(), "--mode", "validate", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = config.read_text(encoding="utf-8")
    if media_root is None:
        assert "disabled: true\n" in text and "disabled: false" not in text
    else:
        assert "disabled: false" in text
        # The mapping's quoted text reads back as the folder (YAML's double-quoted escapes are
        # JSON's for these characters; Envoy parsed it above).
        quoted = text.split('file_path_prefix: "', 1)[1].split('/"}', 1)[0]
        assert json.loads(f'"{quoted}"') == str(media_root)


def test_a_data_directory_that_is_not_utf8_is_refused_with_a_way_out() -> None:
    undecodable = pathlib.Path(os.fsdecode(b"/srv/\xff/media"))
    with pytest.raises(ValueError, match="GALLERY_ENVOY_SENDS_FILES=false"):
        envoy_config.render(listen="127.0.0.1:0", admin_port=0, backends=["127.0.0.1:1"],
                            media_root=undecodable)
