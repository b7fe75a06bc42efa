"""What the model owner sends is checked before the data owner writes anything."""

from __future__ import annotations

import pytest
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_offsite.errors import UserError
from fl_offsite.federation import client, protocol
from fl_offsite.models.loading import load_model, load_processor
from fl_offsite.offsite.bundle import read_info, write_bundle
from fl_offsite.offsite.plan import make_plan


@pytest.fixture(autouse=True)
def flower_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol") / "bundle"
    write_bundle(load_model("fl-offsite/tiny-opt"), make_plan(8, 2, 2, 2), out,
                 "fl-offsite/tiny-opt", load_processor("fl-offsite/tiny-opt"))
    return out


@pytest.fixture()
def payload(tiny_bundle):
    """A real ``message``-transport bundle payload (what a deployment's model owner sends)."""
    info = read_info(tiny_bundle)
    return info, protocol.bundle_content(tiny_bundle, info.bundle_hash, "message")


@pytest.mark.parametrize("name", ["../escaped.json", "/tmp/absolute.json", "sub/dir.json", "..",
                                  ".hidden", "emulator.safetensors"])
def test_hostile_file_names_are_refused_and_nothing_is_written(payload, tmp_path, name):
    info, content = payload
    files = dict(content["files"].items())
    files[f"file:{name}"] = b"owned"
    content["files"] = ConfigRecord(files)
    target = tmp_path / "cache" / "bundles" / info.bundle_hash
    with pytest.raises(UserError, match="refusing file name"):
        protocol.write_bundle_content(content, target)
    assert not target.exists()
    assert not (tmp_path / "cache" / "bundles" / "escaped.json").exists()
    assert not any(p.name in ("escaped.json", "dir.json", ".hidden") for p in tmp_path.rglob("*"))


def test_a_clean_payload_rebuilds_the_bundle(payload, tmp_path):
    info, content = payload
    target = tmp_path / "copy"
    protocol.write_bundle_content(content, target)
    assert read_info(target).bundle_hash == info.bundle_hash


def test_data_owners_sharing_a_cache_never_remove_a_bundle_another_may_be_reading(
        payload, tmp_path, monkeypatch):
    """Two data owners on one machine receive the same bundle: the one that finishes second
    keeps the first one's directory in place (a reader on it is not disturbed) and leaves no
    temporary copy behind."""
    from fl_offsite import fileio

    info, content = payload
    target = tmp_path / "cache" / "bundles" / info.bundle_hash
    real_save, second = fileio.save_tensors, {}

    def save_while_another_owner_finishes(path, tensors, *args, **kwargs):
        if not second:  # the first writer, half way: the second one writes it all
            second["started"] = True
            protocol.write_bundle_content(content, target)
            second["inode"] = target.stat().st_ino
            second["reader"] = open(target / "offsite.json", "rb")
        return real_save(path, tensors, *args, **kwargs)

    monkeypatch.setattr(fileio, "save_tensors", save_while_another_owner_finishes)
    protocol.write_bundle_content(content, target)
    with second["reader"] as reader:
        assert target.stat().st_ino == second["inode"]
        assert (target / "offsite.json").read_bytes() == reader.read()
    assert read_info(target).bundle_hash == info.bundle_hash
    assert [p.name for p in target.parent.iterdir()] == [info.bundle_hash]


@pytest.mark.parametrize("bad_hash", ["../../outside", "/abs", "ABCDEF0123456789", "x" * 64, "12"])
def test_a_bundle_hash_that_is_not_hex_is_refused_by_the_data_owner(payload, tmp_path, bad_hash):
    _, content = payload
    content["bundle"]["hash"] = bad_hash
    context = Context(run_id=1, node_id=1, node_config={"cache-dir": str(tmp_path / "c"),
                                                        "partition-id": 0},
                      state=RecordDict(), run_config={})
    msg = Message(content, dst_node_id=1, message_type=f"query.{protocol.BUNDLE_ACTION}")
    with pytest.raises(UserError, match="refusing bundle hash"):
        client.receive_bundle(msg, context)
    assert not (tmp_path / "c").exists() and not (tmp_path / "outside").exists()


def test_a_payload_whose_content_is_not_the_announced_bundle_is_never_kept(payload, tiny_bundle,
                                                                          tmp_path):
    """The cache is addressed by the announced hash: a corrupted (or forged) copy written there
    would shadow every good copy sent later, so it is refused before it is renamed into place."""
    info, content = payload
    arrays = content["arrays"]
    key = next(k for k in arrays if k.startswith("emulator.safetensors/"))
    tensor = arrays[key].numpy().copy()
    tensor.flat[0] += 1.0
    arrays[key] = Array(tensor)
    target = tmp_path / "cache" / "bundles" / info.bundle_hash
    with pytest.raises(UserError, match="announced"):
        protocol.write_bundle_content(content, target)
    assert not target.exists() and list((tmp_path / "cache" / "bundles").iterdir()) == []
    good = protocol.bundle_content(tiny_bundle, info.bundle_hash, "message")
    protocol.write_bundle_content(good, target)  # the next, good copy is kept
    assert read_info(target).bundle_hash == info.bundle_hash
