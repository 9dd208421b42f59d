"""The README's main job: `dreambooth demo` trains a made-up subject end to end (on the session's Ray cluster)."""

from __future__ import annotations

import json

from PIL import Image

from dreambooth.cli import main


def test_demo_trains_and_exports(ray_cluster, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "tiny random model" in err and "model:" in err
    assert "training: 100%" in err and "20/20" in err  # the progress bar followed the job to its end
    assert len(list((tmp_path / "subject").glob("*.png"))) == 4
    grids = sorted((tmp_path / "storage" / "jobs" / "demo" / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    assert Image.open(grids[-1]).size == (128, 128)  # 2 prompts x 2 images of 64 px
    metadata = json.loads((tmp_path / "storage" / "models" / "demo" / "metadata.json").read_text())
    assert metadata["steps"] == 20 and metadata["instance_prompt"] == "a photo of sks robot"
