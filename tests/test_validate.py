"""`data_tools validate`: every bad-input kind gives exit 1 and a located message, never a traceback."""

import json

import pytest

GOOD = {"instruction": "抽出せよ", "input": "警視庁は、窃盗の疑いで会社員山田太郎容疑者（34）を逮捕した。",
        "output": json.dumps({"offenders": [{"name": "山田太郎", "age": 34, "occupation": "会社員",
                                             "address": None, "charge": "窃盗"}]}, ensure_ascii=False)}
NEG = {**GOOD, "input": "佐藤花子さん（70）が表彰された。", "output": '{"offenders": []}'}


def jsonl(*records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def validate(cli, path):
    return cli("-m", "data_tools", "validate", str(path))


def test_good_files_pass(cli, tmp_path):
    for name, content in (("a.jsonl", jsonl(GOOD, NEG)),
                          ("b.json", json.dumps([GOOD, NEG], ensure_ascii=False, indent=2))):
        r = validate(cli, write(tmp_path, name, content))
        assert r.returncode == 0, r.stderr
        assert "2 records, 0 error(s)" in r.stdout


BAD = [
    ("invalid_json.jsonl", jsonl(GOOD) + '{"instruction": "x", "input": \n', ":2:", "invalid JSON"),
    ("truncated.json", json.dumps([GOOD, NEG, GOOD], ensure_ascii=False)[:-40], "[2]", "truncated"),
    ("bom.json", b"\xef\xbb\xbf" + json.dumps([GOOD], ensure_ascii=False).encode(), ":1", "byte-order mark"),
    ("bad_utf8.jsonl", jsonl(GOOD).encode() + "山田".encode("cp932") + b"\n", ":2", "invalid UTF-8"),
    ("crlf.jsonl", jsonl(GOOD, NEG).replace("\n", "\r\n"), ":1", "CRLF"),
    ("object.json", json.dumps({"data": [GOOD]}, indent=2), "object.json", "top level is one JSON object"),
    ("missing.jsonl", jsonl(GOOD, {"instruction": "x", "output": '{"offenders": []}'}), ":2", "missing field 'input'"),
    ("nonstring.json", json.dumps([GOOD, {**GOOD, "input": 42}]), "[1]", "'input' must be a string"),
    ("output_not_json.jsonl", jsonl({**GOOD, "output": "山田太郎"}), ":1", "'output' is not valid JSON"),
    ("output_schema.jsonl", jsonl({**GOOD, "output": '{"offender": []}'}), ":1", "'offenders' list"),
    ("output_no_name.jsonl", jsonl({**GOOD, "output": '{"offenders": [{"age": 3}]}'}), ":1", "has no name"),
    ("nan_record.jsonl", '{"instruction": "x", "input": NaN, "output": "{}"}\n', ":1", "NaN"),
    ("nan_output.jsonl", jsonl({**GOOD, "output": '{"offenders": [{"name": "山田太郎", "age": NaN}]}'}), ":1", "NaN"),
    ("empty.json", "", "empty.json", "empty"),
    ("blank.jsonl", "\n  \n", "blank.jsonl", "empty"),
    ("empty_array.json", "[]", "empty_array.json", "no records"),
    ("empty_input.jsonl", jsonl({**GOOD, "input": "  "}), ":1", "article) is empty"),
    ("not_object.json", json.dumps([GOOD, "text"]), "[1]", "record is a string"),
    ("trailing.json", json.dumps([GOOD]) + "\n]", ":2:1", "unexpected text"),
]


@pytest.mark.parametrize("name,content,location,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_located_errors(cli, tmp_path, name, content, location, message):
    path = write(tmp_path, name, content)
    r = validate(cli, path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out
    error_lines = [line for line in r.stderr.splitlines() if message in line]
    assert error_lines, out
    assert location in error_lines[0] and name in error_lines[0], error_lines[0]
    assert "FAILED" in r.stdout


def test_warnings_do_not_fail(cli, tmp_path):
    absent = {**GOOD, "output": json.dumps({"offenders": [{"name": "鈴木一郎", "age": "34歳"}]}, ensure_ascii=False)}
    path = write(tmp_path, "warn.jsonl", jsonl(GOOD, GOOD, absent))
    r = validate(cli, path)
    assert r.returncode == 0, r.stderr
    assert "warn.jsonl:2: warning: duplicate article (same text as" in r.stdout
    assert "does not occur in the article" in r.stdout
    assert "expected an integer or null" in r.stdout


def test_every_error_is_reported_not_just_the_first(cli, tmp_path):
    path = write(tmp_path, "many.jsonl", jsonl(*[{**GOOD, "output": "x"}] * 3))
    r = validate(cli, path)
    assert r.returncode == 1
    assert [f"many.jsonl:{i}:" in r.stderr for i in (1, 2, 3)] == [True] * 3
    assert "3 error(s)" in r.stdout


def test_missing_file(cli, tmp_path):
    r = validate(cli, tmp_path / "nope.json")
    assert r.returncode == 1 and "file not found" in r.stderr and "Traceback" not in r.stderr
