"""`data_tools validate`: every bad-input kind gives exit 1 and a located message, never a traceback."""

import json
import re

import pytest

from core.records import DataError, load_records

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
    ("bad_utf8.jsonl", jsonl(GOOD).encode() + "山田".encode("cp932") + b"\n", ":2", "invalid UTF-8"),
    ("object.json", json.dumps({"data": [GOOD]}, indent=2), "object.json", "top level is one JSON object"),
    ("one_record.json", json.dumps(GOOD), "one_record.json", "top level is one JSON object"),
    ("pretty_broken.json", '{\n  "instruction": "x",,\n}\n', "pretty_broken.json", "top level is one JSON object"),
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
    assert re.search(r"^warning: \S*warn.jsonl:2: duplicate article \(same text as", r.stdout, re.M)
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


# --- one reader (core.records.iter_rows) behind validate and every loader ---

def loader_error(path) -> str:
    with pytest.raises(DataError) as e:
        load_records(path)
    return str(e.value)


@pytest.mark.parametrize("name,encode,warning", [
    ("crlf.jsonl", lambda t: t.replace("\n", "\r\n").encode(), "Windows line endings (CRLF); read as plain newlines"),
    ("bom.jsonl", lambda t: b"\xef\xbb\xbf" + t.encode(), "UTF-8 byte-order mark (BOM) at the start; read without it"),
    ("both.jsonl", lambda t: b"\xef\xbb\xbf" + t.replace("\n", "\r\n").encode(), "CRLF"),
])
def test_crlf_and_bom_are_read_everywhere_with_one_warning(cli, tmp_path, capsys, name, encode, warning):
    plain = write(tmp_path, "plain.jsonl", jsonl(GOOD, NEG))
    path = write(tmp_path, name, encode(jsonl(GOOD, NEG)))
    r = validate(cli, path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"warning: {path}: " in r.stdout and warning in r.stdout
    assert r.stdout.count("line endings") <= 1 and r.stdout.count("byte-order mark") <= 1  # one line per file
    assert "2 records, 0 error(s)" in r.stdout

    assert load_records(path) == load_records(plain)
    assert f"warning: {path}: " in capsys.readouterr().err

    r = cli("-m", "data_tools", "convert", str(path), str(tmp_path / "m.jsonl"), "--to", "messages")
    assert r.returncode == 0, r.stderr
    assert warning in r.stderr and r.stderr.count("line endings") <= 1 and r.stderr.count("byte-order mark") <= 1
    r = cli("-m", "data_tools", "prepare", "--positives", str(path), "--negatives", str(plain), "--val", str(plain),
            "--num-negatives", "1", "--out", str(tmp_path / "o.json"), "--val-out", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stderr
    assert warning in r.stderr
    r = cli("-m", "data_tools", "stats", str(path))
    assert r.returncode == 0 and warning in r.stderr


def test_bom_json_array_is_a_warning(cli, tmp_path):
    path = write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps([GOOD], ensure_ascii=False).encode())
    r = validate(cli, path)
    assert r.returncode == 0 and f"warning: {path}: UTF-8 byte-order mark" in r.stdout, r.stdout + r.stderr
    assert load_records(path) == [GOOD]


def test_single_object_json_is_rejected_by_validate_and_loader_alike(cli, tmp_path):
    path = write(tmp_path, "one.json", json.dumps(GOOD, ensure_ascii=False))
    expected = (f"{path}: the top level is one JSON object (keys: instruction, input, output), expected an array "
                "of records: wrap it in [...], or write one record per line and name the file .jsonl")
    r = validate(cli, path)
    assert r.returncode == 1 and f"error: {expected}\n" in r.stderr, r.stderr
    assert loader_error(path) == expected
    for args in (["stats", str(path)], ["convert", str(path), str(tmp_path / "m.jsonl"), "--to", "messages"]):
        r = cli("-m", "data_tools", *args)
        assert r.returncode == 1 and f"error: {expected}\n" in r.stderr, r.stderr
    # the same single line named .jsonl is one record of JSON Lines
    one = write(tmp_path, "one.jsonl", jsonl(GOOD))
    assert validate(cli, one).returncode == 0 and load_records(one) == [GOOD]


def test_jsonl_is_checked_line_by_line_and_the_loader_stops_at_the_first(cli, tmp_path):
    lines = jsonl(GOOD, NEG, {**GOOD, "input": "別の記事。山田太郎容疑者を逮捕。"}, NEG, {**NEG, "input": "別の表彰記事。"},
                  {"instruction": "x", "output": '{"offenders": []}'}).splitlines()
    lines[1] = '{"instruction": "x", "input": '
    lines[3] = '{"instruction": "x", "input": NaN, "output": "{}"}'
    path = write(tmp_path, "three.jsonl", "\n".join(lines) + "\n")
    r = validate(cli, path)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert [e.split(": ")[1].split(":")[1] for e in errors] == ["2", "4", "6"], r.stderr
    assert "invalid JSON" in errors[0] and "NaN" in errors[1] and "missing field 'input'" in errors[2]
    assert "4 records, 3 error(s)" in r.stdout and "2 unreadable entries skipped" in r.stdout
    assert "2 line(s) could not be read as JSON and were skipped" in r.stdout

    message = loader_error(path)
    assert f"error: {message}" == errors[0]
    r = cli("-m", "data_tools", "stats", str(path))
    assert r.returncode == 1 and r.stderr.strip() == errors[0]


def test_broken_json_array_says_it_cannot_read_further(cli, tmp_path):
    text = json.dumps([GOOD, NEG, GOOD], ensure_ascii=False, indent=1)
    broken = text.replace('"output"', '"output" "', 1)
    path = write(tmp_path, "broken.json", broken + "\n" + "garbage\n")
    r = validate(cli, path)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "record [0]: invalid JSON" in errors[0], r.stderr
    assert "cannot be parsed past a syntax error, so nothing after it was checked" in r.stdout
    assert f"error: {loader_error(path)}" == errors[0]


def test_nan_in_a_json_array_does_not_hide_later_records(cli, tmp_path):
    text = ("[" + json.dumps(GOOD, ensure_ascii=False) + ',\n{"instruction": "x", "input": NaN, "output": "{}"},\n'
            + json.dumps({"instruction": "x", "output": "{}"}) + "]")
    path = write(tmp_path, "nan.json", text)
    r = validate(cli, path)
    assert r.returncode == 1
    assert "nan.json:[1] (line 2): NaN is not valid JSON" in r.stderr and "nan.json:[2]: missing field 'input'" in r.stderr
    assert "2 records, 2 error(s)" in r.stdout and "1 unreadable entry skipped" in r.stdout
    assert "nan.json:[1] (line 2): NaN" in loader_error(path)
