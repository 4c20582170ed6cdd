"""atomic_path: the one way files are replaced (checkpoints, save_pretrained, the image-folder scan cache)."""
import pytest

from vit.utils.files import atomic_path


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as part:
            part.write_text("half of the new one")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_finished_write_replaces_the_file(tmp_path, durable):
    with atomic_path(tmp_path / "sub" / "config.json", durable=durable) as part:
        part.write_text("new")
    assert (tmp_path / "sub" / "config.json").read_text() == "new"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["config.json"]
