"""Fuzzing manifests: both readers (`shard_tools.verify.read_manifest` and the training loader's
`cxrdist.data.read_manifest`) raise only `ManifestError` on bad input, and accept exactly the same
manifests; what they accept, `shard_tools.verify` checks without crashing."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cxrdist.data
from shard_tools import verify as verify_mod
from shard_tools.schema import MANIFEST_NAME, SPLITS, ManifestError

HOSTILE_FILES = [
    "train-000000.tar; touch PWNED #",
    "../other/test-000000.tar",
    "/etc/passwd",
    "train-000000.tar\n",
    "train-000000.tar\x00.png",
    " train-000000.tar",
    "TRAIN-000000.tar",
    "train-0000000.tar",
    "train-000000.tar/",
    "$(touch PWNED).tar",
    "https://evil.example/train-000000.tar",
    "val-000000.tar",  # a real name, but of another split
    "",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["train", "COVID", "train-000000.tar", "0" * 64, *HOSTILE_FILES]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def sound(synth_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny but complete shard folder (28 images at 32 px, one shard per split)."""
    from shard_tools.pack import pack

    src = tmp_path_factory.mktemp("fuzz-src")
    for c in ("COVID", "Normal"):
        (src / c).mkdir()
        for i in range(1, 8):
            shutil.copy(synth_src / c / "images" / f"{c}-{i}.png", src / c)
    out = tmp_path_factory.mktemp("fuzz") / "out"
    pack(src, out, size=32, min_shards=1, classes=["COVID", "Normal"], progress=False)
    return out


@pytest.fixture(scope="module")
def valid(sound: Path) -> dict[str, Any]:
    return json.loads((sound / MANIFEST_NAME).read_text())


def _folder(raw: bytes, shards_from: Path | None = None) -> Iterator[Path]:
    """A temporary shard folder holding `raw` as its manifest (and links to real shards)."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / MANIFEST_NAME).write_bytes(raw)
        if shards_from is not None:
            for p in shards_from.glob("*.tar"):
                (folder / p.name).symlink_to(p)
        yield folder


def _outcome(reader, folder: Path) -> tuple[str, Any]:
    """("ok", the parsed manifest) or ("rejected", None); any other exception propagates and fails."""
    try:
        result = reader(str(folder))
    except ManifestError as e:
        assert "\n" not in str(e), str(e)  # one line
        return "rejected", None
    return "ok", result if isinstance(result, dict) else result.data


def _both(raw: bytes, shards_from: Path | None = None) -> tuple[str, Any]:
    for folder in _folder(raw, shards_from):
        ours = _outcome(verify_mod.read_manifest, folder)
        loader = _outcome(cxrdist.data.read_manifest, folder)
        assert ours[0] == loader[0], (ours[0], loader[0], raw[:300])
        if ours[0] == "ok":
            assert json.dumps(ours[1], sort_keys=True) == json.dumps(loader[1], sort_keys=True)
            # Nothing downstream of a valid manifest may crash: problems are reported, not raised.
            problems = verify_mod.verify(folder, workers=1)
            assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
            verify_mod.summary_table(ours[1], "t")
        return ours
    raise AssertionError("unreachable")


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path into a JSON value, the value itself included."""
    found = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


def _mutate(manifest: dict, path: tuple, op: str, value: Any) -> Any:
    m = copy.deepcopy(manifest)
    if not path:
        return value
    parent = m
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if op == "drop":
        del parent[last]
    else:
        parent[last] = value
    return m


def test_the_sound_manifest_is_accepted_by_both(sound: Path):
    raw = (sound / MANIFEST_NAME).read_bytes()
    status, manifest = _both(raw, sound)
    assert status == "ok" and verify_mod.verify(sound, workers=1) == []
    assert {s: manifest["splits"][s]["count"] for s in SPLITS} == {"train": 10, "val": 2, "test": 2}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_random_json_is_rejected_alike(value):
    status, _ = _both(json.dumps(value).encode())
    assert status == "rejected"  # random JSON is never a manifest


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifests_are_judged_alike(valid: dict, sound: Path, data):
    paths = _paths(valid)
    path = data.draw(st.sampled_from(paths), label="path")
    op = data.draw(st.sampled_from(["drop", "replace"]) if path else st.just("replace"), label="op")
    value = None
    if op == "replace":
        pick = st.sampled_from(HOSTILE_FILES) if path and path[-1] == "file" else json_values
        value = data.draw(st.one_of(pick, json_values), label="value")
    status, _ = _both(json.dumps(_mutate(valid, path, op, value)).encode(), sound)
    event(status)  # `pytest --hypothesis-show-statistics` shows how many were accepted


@pytest.mark.parametrize("file", HOSTILE_FILES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_hostile_shard_names_are_rejected_by_both(valid: dict, sound: Path, tmp_path: Path, split, file):
    m = copy.deepcopy(valid)
    m["splits"][split]["shards"][0]["file"] = file
    status, _ = _both(json.dumps(m).encode(), sound)
    assert status == "rejected"
    assert not list(Path.cwd().glob("PWNED")) and not list(tmp_path.glob("PWNED"))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(splits=[]),
        lambda m: m["splits"]["train"]["shards"][0].pop("sha256"),
        lambda m: m.update(classes="COVID"),
        lambda m: m["splits"]["train"]["shards"][0].update(count=True),
        lambda m: m["splits"]["val"].update(class_counts={"COVID": 1, "Elephant": 1}),
        lambda m: m.update(image_size=32.0),
        lambda m: m.update(groups={"file": "g.csv", "sha256": "0" * 64, "ungrouped": "error"}),
    ],
    ids=["splits-list", "no-sha256", "classes-string", "bool-count", "unknown-class", "float-size", "groups"],
)
def test_the_issue_cases_are_rejected_by_both(valid: dict, sound: Path, change):
    m = copy.deepcopy(valid)
    change(m)
    assert _both(json.dumps(m).encode(), sound)[0] == "rejected"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"\xef\xbb\xbf{}",  # a byte-order mark
        "{}".encode("utf-16"),
        b'{"format_version": 1, "classes": ["\xff"]}',  # not UTF-8
        b'{"format_version": NaN}',
        b'"\\ud800"',  # a lone surrogate
        b"[" * 100_000,  # RecursionError inside json
        b"1" * 5000,  # ValueError: more digits than Python converts
    ],
    ids=["empty", "null", "bom", "utf16", "latin1", "nan", "surrogate", "deep-nesting", "huge-int"],
)
def test_hostile_bytes_are_rejected_by_both(raw: bytes):
    assert _both(raw)[0] == "rejected"


def test_encodings_json_accepts_are_accepted_by_both(valid: dict, sound: Path):
    text = json.dumps(valid)
    for raw in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.encode("utf-32")):
        assert _both(raw, sound)[0] == "ok"
