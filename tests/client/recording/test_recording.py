"""Episode files: round trip, crash safety, and a reader that names exactly what is wrong."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import msgpack
import numpy as np
import pytest

from chatvla.client.recording import (
    FORMAT,
    ChunkRecord,
    EncodedImage,
    EpisodeFormatError,
    EpisodeReader,
    EpisodeWriter,
    encode_array,
    read_episode,
)
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT


@pytest.mark.parametrize("encoding", ["jpeg", "rgb8"])
def test_round_trip(tmp_path, make_episode, encoding):
    path = tmp_path / "ep.chatvla"
    acts = make_episode(path, n=20, encoding=encoding)
    ep = read_episode(path)
    h = ep.header
    assert h.profile == FRANKA_JOINT
    assert h.instruction.startswith("place the card")
    assert h.task == {"name": "math_matching", "a": 3, "b": 4, "held_out": False}
    assert h.cameras == ("front", "wrist") and h.image_encoding == encoding
    assert [r.tick for r in ep.records] == list(range(20))
    np.testing.assert_array_equal(np.stack([r.action for r in ep.records]), acts)
    assert ep.records[0].state.dtype == np.float32
    assert [r.stall for r in ep.records].count(True) == 2
    assert ep.records[9].interventions == ("step_limit",)
    c = ep.records[8].chunk
    assert c is not None and (c.seq, c.tick) == (1, 6)
    assert c.actions.shape == (FRANKA_JOINT.chunk_size, 8) and c.actions.dtype == np.float32
    assert "answer is 7" in c.reasoning and c.timings["expert"] == 12.0
    assert ep.records[1].chunk is None
    wrist = ep.records[0].images["wrist"]
    assert (wrist.encoding, wrist.height, wrist.width) == (encoding, 24, 24)
    pixels = wrist.decode()
    assert pixels.shape == (24, 24, 3)
    if encoding == "rgb8":
        assert (pixels == 200).all()
    else:
        assert abs(float(pixels.mean()) - 200) < 3  # lossy, but the same picture
    assert ep.footer is not None and ep.footer.ticks == 20
    assert ep.footer.outcome == {"success": False, "reason": "untrained model"}
    assert ep.truncated_bytes == 0


def test_already_encoded_images_are_stored_as_is(tmp_path):
    img = EncodedImage("jpeg", 2, 2, b"\xff\xd8fake-jpeg-bytes")
    with EpisodeWriter(tmp_path / "e", FRANKA_JOINT, instruction="x", cameras=["front"]) as w:
        w.append(tick=0, timestamp=0.0, state=FRANKA_JOINT.home, action=None, images={"front": img})
    rec = read_episode(tmp_path / "e").records[0]
    assert rec.images["front"] == img and rec.action is None


def test_crash_leaves_a_readable_file_without_end_record(tmp_path, make_episode):
    path = tmp_path / "ep.chatvla"
    make_episode(path, n=12, close=False)
    ep = read_episode(path)
    assert len(ep.records) == 12 and ep.footer is None and ep.truncated_bytes == 0


def test_truncated_tail_is_named_and_can_be_skipped(tmp_path, episode_file):
    path, _ = episode_file
    data = path.read_bytes()
    cut = tmp_path / "cut.chatvla"
    cut.write_bytes(data[: len(data) - 700])  # inside the last tick record (and past the end record)
    with pytest.raises(EpisodeFormatError, match=r"truncated tail: \d+ bytes of an incomplete record after record 39"):
        read_episode(cut)
    ep = read_episode(cut, allow_truncated=True)
    assert len(ep.records) == 39 and ep.footer is None and ep.truncated_bytes > 0


def test_truncated_header(tmp_path, episode_file):
    path, _ = episode_file
    cut = tmp_path / "cut.chatvla"
    cut.write_bytes(path.read_bytes()[:50])
    with pytest.raises(EpisodeFormatError, match="record 0: bad magic or truncated header"):
        read_episode(cut)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "record 0"),
        (msgpack.packb({"format": "something.else", "version": 1}), "bad magic"),
        (msgpack.packb([1, 2, 3]), "bad magic"),
        (b"hello world, not msgpack", "bad magic"),
    ],
)
def test_not_an_episode(tmp_path, content, words):
    p = tmp_path / "x"
    p.write_bytes(content)
    with pytest.raises(EpisodeFormatError, match=words):
        read_episode(p)


# --- corrupted fields, each named ------------------------------------------------------------------------
def _objects(path) -> list[dict]:
    return list(msgpack.Unpacker(io.BytesIO(path.read_bytes()), raw=False))


def _rewrite(tmp_path, objs) -> str:
    p = tmp_path / "bad.chatvla"
    p.write_bytes(b"".join(msgpack.packb(o, use_bin_type=True) for o in objs))
    return p


def _set(obj: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        obj = obj[k]
    if value is KeyError:
        del obj[last]
    else:
        obj[last] = value


STATE_F64 = encode_array(np.zeros(8, dtype=np.float64))
STATE_7 = encode_array(np.zeros(7, dtype=np.float32))
BAD_ACTIONS = encode_array(np.zeros((16, 7), dtype=np.float32))


@pytest.mark.parametrize(
    "record, dotted, value, words",
    [
        (0, "version", 99, "record 0 field 'version': unsupported version 99"),
        (0, "profile.action_names", ["a"], "record 0 field 'profile': invalid robot profile"),
        (0, "image_encoding", "webp", "record 0 field 'image_encoding'"),
        (1, "state", KeyError, "record 1 field 'state': missing"),
        (1, "state", STATE_F64, "record 1 field 'state': dtype must be float32, got float64"),
        (1, "state", STATE_7, r"record 1 field 'state': shape must be \[8\], got \[7\]"),
        (1, "state.dtype", "object", "record 1 field 'state': dtype 'object' is not allowed"),
        (1, "state.data", b"\x00" * 5, "record 1 field 'state': 5 bytes do not match shape"),
        (1, "state.shape", "8", "record 1 field 'state': shape must be a list"),
        (2, "action", STATE_7, r"record 2 field 'action': shape must be \[8\]"),
        (2, "action", KeyError, "record 2 field 'action': missing"),
        (1, "chunk.actions", BAD_ACTIONS, r"record 1 field 'chunk.actions': shape must be \['\*', 8\]"),
        (1, "chunk.seq", "zero", "record 1 field 'chunk.seq': expected int, got str"),
        (1, "chunk.reasoning", KeyError, "record 1 field 'chunk.reasoning': missing"),
        (3, "images.front.data", b"not a jpeg", "record 3 field 'images.front.data': data is not a JPEG"),
        (3, "images.front.height", True, "record 3 field 'images.front.height': expected int, got bool"),
        (3, "images.top", {}, "record 3 field 'images.top': camera not in the header's cameras"),
        (4, "stall", 1, "record 4 field 'stall': expected bool, got int"),
        (4, "interventions", [3], "record 4 field 'interventions'"),
        (5, "tick", 2, "record 5 field 'tick': tick 2 does not follow tick 3"),
        (5, "kind", "tock", "record 5 field 'kind': unknown record kind 'tock'"),
        (41, "ticks", 7, "record 41 field 'ticks': end record counts 7 ticks, the file has 40"),
    ],
)
def test_corrupted_field_is_named(tmp_path, episode_file, record, dotted, value, words):
    path, _ = episode_file
    objs = _objects(path)
    bad = copy.deepcopy(objs)
    _set(bad[record], dotted, value)
    with pytest.raises(EpisodeFormatError, match=words) as e:
        read_episode(_rewrite(tmp_path, bad))
    assert e.value.record == record


def test_data_after_end_record(tmp_path, episode_file):
    path, _ = episode_file
    objs = _objects(path)
    with pytest.raises(EpisodeFormatError, match="record 42: data after the end record"):
        read_episode(_rewrite(tmp_path, [*objs, objs[1]]))


def test_reader_streams_records(episode_file):
    path, _ = episode_file
    with EpisodeReader(path) as r:
        assert r.header.profile.name == "franka_joint"
        first = next(iter(r))
        assert first.index == 1 and first.tick == 0


# --- the writer refuses what the reader would refuse -----------------------------------------------------
def test_writer_checks_inputs(tmp_path):
    w = EpisodeWriter(tmp_path / "e", FRANKA_JOINT, instruction="x")
    home = np.array(FRANKA_JOINT.home)
    with pytest.raises(ValueError, match="state has 7 values"):
        w.append(tick=0, timestamp=0, state=home[:7], action=home)
    with pytest.raises(ValueError, match="cameras"):
        w.append(tick=0, timestamp=0, state=home, action=home, images={"top": np.zeros((2, 2, 3), np.uint8)})
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        w.append(tick=0, timestamp=0, state=home, action=home, images={"front": np.zeros((2, 2), np.uint8)})
    bad_chunk = ChunkRecord(seq=0, tick=0, actions=np.zeros((4, 14), np.float32))
    with pytest.raises(ValueError, match=r"chunk.actions must be \[H, 8\]"):
        w.append(tick=0, timestamp=0, state=home, action=home, chunk=bad_chunk)
    w.append(tick=3, timestamp=0, state=home, action=home)
    with pytest.raises(ValueError, match="not after the previous tick 3"):
        w.append(tick=3, timestamp=0, state=home, action=home)
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.append(tick=4, timestamp=0, state=home, action=home)
    assert len(read_episode(tmp_path / "e").records) == 1
    with pytest.raises(FileExistsError):
        EpisodeWriter(tmp_path / "e", FRANKA_JOINT, instruction="x")
    with pytest.raises(TypeError, match=r"task.arr: ndarray cannot be recorded"):
        EpisodeWriter(tmp_path / "f", ARX_R5_BIMANUAL, instruction="x", task={"arr": np.zeros(2)})


def test_no_pickle_anywhere():
    """Object arrays cannot be written, and the module never touches pickle."""
    import chatvla.client.recording as rec

    with pytest.raises(TypeError, match="not recordable"):
        encode_array(np.array([object()]))
    src = "".join(p.read_text() for p in Path(rec.__file__).parent.glob("*.py"))
    assert "import pickle" not in src and "allow_pickle" not in src
    assert FORMAT == "chatvla.episode"
