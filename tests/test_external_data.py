"""Loaders for external data files: PersonalityEdit JSON, Big5-Chat CSV, EmpatheticDialogues-style CSV."""

import json

import pytest

from personaedit.data.external import (
    DialogueExample,
    PersonalityEditRecord,
    load_big5_chat,
    load_dialogue_openers,
    load_personality_edit,
    to_opinion_rows,
)
from personaedit.errors import InputFileError, PersonaEditError, PersonaSpecError


def write(path, text, bom=False, encoding="utf-8"):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------
# PersonalityEdit

PE_RECORDS = [
    {
        "ent": "Coldplay",
        "extraversion": ["Coldplay concerts are the best parties!", "I sing along with everyone."],
        "agreeableness": ["Their kindness to fans is lovely."],
        "neuroticism": ["Their sad songs make me worry."],
        "target_per": "agreeableness",
        "cond": "Topic: Coldplay",
    },
    {
        "ent": "Paris",
        "extraversion": ["Paris nightlife is thrilling."],
        "agreeableness": [],
        "neuroticism": ["Crowds in Paris stress me out.", "  "],
    },
]


def test_personality_edit_json_list(tmp_path):
    path = write(tmp_path / "train.json", json.dumps(PE_RECORDS))
    records = load_personality_edit(path)
    assert records[0] == PersonalityEditRecord(
        topic="Coldplay",
        texts={
            "extraversion": ["Coldplay concerts are the best parties!", "I sing along with everyone."],
            "agreeableness": ["Their kindness to fans is lovely."],
            "neuroticism": ["Their sad songs make me worry."],
        },
        target="agreeableness",
        extra={"cond": "Topic: Coldplay"},
    )
    # no target, an empty list kept as empty, a blank text dropped
    assert records[1].target is None
    assert records[1].texts == {
        "extraversion": ["Paris nightlife is thrilling."],
        "agreeableness": [],
        "neuroticism": ["Crowds in Paris stress me out."],
    }
    assert records[1].extra == {}


def test_personality_edit_messy_keys_jsonl_and_bom(tmp_path):
    lines = [
        {"ent": "tea", "Extraversion": ["Tea parties!"], "AGREEABLENESS": ["Sharing tea is kind."],
         "Neuroticism": ["Too much tea makes me jittery."], "target_per": 2, "pre": "x", "Cond": 1},
        {"ENT": "jazz", "extraversion": "Jazz clubs are loud fun.", "target_per": "NEUROTICISM"},
        {"ent": "golf", "neuroticism": ["Golf makes me tense."], "target_per": "1"},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + "\n\n"
    for name in ("data.jsonl", "data.json"):  # JSON Lines detected by suffix and by content
        records = load_personality_edit(write(tmp_path / name, text, bom=True))
        assert [r.topic for r in records] == ["tea", "jazz", "golf"]
        assert records[0].texts == {
            "extraversion": ["Tea parties!"],
            "agreeableness": ["Sharing tea is kind."],
            "neuroticism": ["Too much tea makes me jittery."],
        }
        assert records[0].target == "neuroticism"  # index 2 in (extraversion, agreeableness, neuroticism)
        assert records[0].extra == {"pre": "x", "Cond": 1}
        assert records[1].texts == {"extraversion": ["Jazz clubs are loud fun."]}  # a lone string
        assert records[1].target == "neuroticism"
        assert records[2].target == "agreeableness"  # "1" as an index


def test_personality_edit_target_index_zero_and_wrapped_document(tmp_path):
    doc = {"data": [{"ent": "chess", "extraversion": ["Chess clubs are social."], "target_per": 0}]}
    records = load_personality_edit(write(tmp_path / "wrapped.json", json.dumps(doc)))
    assert len(records) == 1 and records[0].target == "extraversion"
    single = {"ent": "rain", "neuroticism": ["Rain makes me gloomy."]}
    records = load_personality_edit(write(tmp_path / "single.json", json.dumps(single)))
    assert records[0].topic == "rain" and records[0].target is None


def test_to_opinion_rows(tmp_path):
    records = load_personality_edit(write(tmp_path / "train.json", json.dumps(PE_RECORDS)))
    rows = to_opinion_rows(records)
    assert len(rows) == 2 + 1 + 1 + 1 + 1
    assert rows[0] == {
        "topic": "Coldplay", "trait": "extraversion", "pole": "high", "facet": None,
        "text": "Coldplay concerts are the best parties!", "split": None,
    }
    assert list(rows[0]) == ["topic", "trait", "pole", "facet", "text", "split"]
    assert [(r["topic"], r["trait"]) for r in rows] == [
        ("Coldplay", "extraversion"), ("Coldplay", "extraversion"), ("Coldplay", "agreeableness"),
        ("Coldplay", "neuroticism"), ("Paris", "extraversion"), ("Paris", "neuroticism"),
    ]
    low = to_opinion_rows(records, pole="LOW")
    assert {r["pole"] for r in low} == {"low"}
    with pytest.raises(PersonaSpecError, match="did you mean 'high'"):
        to_opinion_rows(records, pole="hihg")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("ent,extraversion\nx,y\n", "not JSON or JSON Lines"),
        ('[{"ent": "a", "extraversion": ["x"]},', "not JSON or JSON Lines"),
        ('"just a string"', "expected a JSON list of records, found a JSON string"),
        ('{"a": 1, "b": 2}', "found an object with keys a, b"),
        ('[["ent", "x"]]', "record 1 is a JSON list, expected an object"),
        ('[{"extraversion": ["x"]}]', r"record 1 has no topic \('ent'\) \(found keys: extraversion\)"),
        ('[{"ent": "a", "cond": "c"}]', r"record 1 has no trait text lists .*found keys: ent, cond"),
        ('[{"ent": "a", "extravesion": ["x"]}]', "is 'extravesion' meant to be 'extraversion'"),
        ('[{"ent": "a", "extraversion": [1, 2]}]', "'extraversion' must be a list of strings, not list"),
        ('[{"ent": "a", "extraversion": ["x"], "target_per": 3}]', "target_per index 3 is out of range"),
        ('[{"ent": "a", "extraversion": ["x"], "target_per": true}]', "must be a trait name or 0-2"),
        ('[{"ent": "a", "extraversion": ["x"], "target_per": "agreeablness"}]', "did you mean 'agreeableness'"),
    ],
)
def test_personality_edit_errors(tmp_path, content, expected):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(InputFileError, match=expected) as error:
        load_personality_edit(path)
    assert one_line(error).startswith(str(path) + ": ")


def test_personality_edit_jsonl_bad_line_names_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"ent": "a", "extraversion": ["x"]}\n\n{"ent": oops}\n')
    with pytest.raises(InputFileError, match="not JSON or JSON Lines .* at line 3 column"):
        load_personality_edit(path)


def test_missing_empty_directory_and_non_utf8_files(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        load_personality_edit(tmp_path / "nope.json")
    with pytest.raises(InputFileError, match="not a file"):
        load_big5_chat(tmp_path)
    with pytest.raises(InputFileError, match="the file is empty"):
        load_dialogue_openers(write(tmp_path / "empty.csv", " \n\n"))
    with pytest.raises(InputFileError, match="not UTF-8 text"):
        load_personality_edit(write(tmp_path / "latin.json", '[{"ent": "café"}]', encoding="latin-1"))
    assert issubclass(InputFileError, PersonaEditError)  # the CLI prints it as one line


# ----------------------------------------------------------------------------------------------------
# Big5-Chat

BIG5_CSV = (
    "Unnamed: 0,train_input,train_output,trait,level,extra\n"
    '0,"How was your weekend?","Amazing, I went to three parties!",Extraversion,HIGH,a\n'
    '1,How was your weekend?,"I stayed in and read,\nquietly.",extraversion,low,b\n'
    "2,Can you help me?,Of course I can.,AGREEABLENESS,High,c\n"
    ",,,,,\n"
    "3,Any plans?,I will explore a new city.,Openness,high,d\n"
    "4,Are you worried?,Always.,neuroticism,high,e\n"
)


def test_big5_chat_all_rows(tmp_path):
    examples = load_big5_chat(write(tmp_path / "big5.csv", BIG5_CSV, bom=True))
    assert examples[:2] == [
        DialogueExample("extraversion", "high", "How was your weekend?", "Amazing, I went to three parties!"),
        DialogueExample("extraversion", "low", "How was your weekend?", "I stayed in and read,\nquietly."),
    ]
    assert [(e.trait, e.pole) for e in examples] == [
        ("extraversion", "high"), ("extraversion", "low"), ("agreeableness", "high"),
        ("openness", "high"), ("neuroticism", "high"),
    ]


def test_big5_chat_filters_and_limit(tmp_path):
    path = write(tmp_path / "big5.csv", BIG5_CSV)
    assert [e.response for e in load_big5_chat(path, trait="Extraversion")] == [
        "Amazing, I went to three parties!", "I stayed in and read,\nquietly.",
    ]
    assert [e.trait for e in load_big5_chat(path, pole="HIGH")] == [
        "extraversion", "agreeableness", "openness", "neuroticism",
    ]
    assert load_big5_chat(path, trait="extroversion", pole="low")[0].prompt == "How was your weekend?"
    assert [e.trait for e in load_big5_chat(path, pole="high", limit=2)] == ["extraversion", "agreeableness"]
    assert load_big5_chat(path, limit=0) == []
    with pytest.raises(PersonaSpecError, match="did you mean 'conscientiousness'"):
        load_big5_chat(path, trait="conscientious")
    with pytest.raises(PersonaSpecError, match="unknown pole"):
        load_big5_chat(path, pole="medium")
    with pytest.raises(ValueError, match="limit"):
        load_big5_chat(path, limit=-1)


def test_big5_chat_tab_separated_and_capitalised_header(tmp_path):
    text = "Trait\tLevel\tTrain_Input\tTrain_Output\nConscientiousness\tlow\tDone yet?\tMeh, later.\n"
    examples = load_big5_chat(write(tmp_path / "big5.tsv", text))
    assert examples == [DialogueExample("conscientiousness", "low", "Done yet?", "Meh, later.")]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("trait,level,prompt,reply\nopenness,high,a,b\n",
         r"missing required column\(s\) 'train_input', 'train_output' \(found columns: trait, level, prompt, reply\)"),
        ("trait,level,train_input,train_output\nopenness,high,a,b\nextraverson,high,c,d\n",
         "line 3: unknown trait 'extraverson' .*did you mean 'extraversion'"),
        ("trait,level,train_input,train_output\nopenness,medium,a,b\n", "line 2: unknown level 'medium'"),
        ('[{"trait": "openness"}]', r"not CSV \(it looks like JSON\)"),
    ],
)
def test_big5_chat_errors(tmp_path, content, expected):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(InputFileError, match=expected) as error:
        load_big5_chat(path)
    assert one_line(error).startswith(str(path) + ": ")


# ----------------------------------------------------------------------------------------------------
# EmpatheticDialogues-style openers

# As in the released files: no quoting, commas escaped as _comma_, rows out of order, a quote opening a
# field that never closes (taken literally), and trailing empty selfeval/tags fields.
ED_CSV = (
    "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"
    "hit:0_conv:1,2,sentimental,I remember fireworks_comma_ with my friend.,0,Was it fun?,,\n"
    "hit:0_conv:1,1,sentimental,I remember fireworks_comma_ with my friend.,1,"
    "I remember going to see the fireworks with my best friend_comma_ it was great.,5|5|5_2|2|5,\n"
    "hit:1_conv:3,1,afraid,Scary movie night.,3,\"Scary movies_comma_ I can't stand them!,,\n"
    "hit:1_conv:3,2,afraid,Scary movie night.,4,Why not?,,\n"
    "hit:2_conv:5,1,proud,My son won.,5,I remember going to see the fireworks with my best friend_comma_ "
    "it was great.,,\n"
    "hit:3_conv:7,10,joyful,Got a job.,6,I finally got the job!,,\n"
    "hit:3_conv:7,3,joyful,Got a job.,7,  ,,\n"
)


def test_dialogue_openers_first_utterance_per_conversation(tmp_path):
    path = write(tmp_path / "train.csv", ED_CSV, bom=True)
    assert load_dialogue_openers(path) == [
        "I remember going to see the fireworks with my best friend, it was great.",
        "\"Scary movies, I can't stand them!",
        "I finally got the job!",  # idx 3 is blank, so idx 10 opens; conv 5 repeats conv 1's opener
    ]
    assert load_dialogue_openers(path, limit=2) == [
        "I remember going to see the fireworks with my best friend, it was great.",
        "\"Scary movies, I can't stand them!",
    ]


def test_dialogue_openers_speaker_uttr_column_without_conversations(tmp_path):
    text = (
        "Speaker_Uttr,context\n"
        '"Hi, how are you?",greeting\n'
        "I lost my keys_comma_ again.,sad\n"
        ",empty\n"
        '"Hi, how are you?",greeting\n'
        "Guess what happened today!,joy\n"
    )
    path = write(tmp_path / "hf.csv", text)
    assert load_dialogue_openers(path) == ["Hi, how are you?", "I lost my keys, again.", "Guess what happened today!"]


def test_dialogue_openers_properly_quoted_file_with_escaped_commas(tmp_path):
    text = (
        "conv_id,utterance_idx,speaker_idx,utterance\n"
        'c1,1,1,"He said ""hi"", then left_comma_ sadly."\n'
        "c1,2,2,Oh no.\n"
        'c2,1,1,"Plain, quoted."\n'
    )
    path = write(tmp_path / "quoted.csv", text)
    assert load_dialogue_openers(path) == ['He said "hi", then left, sadly.', "Plain, quoted."]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("conv_id,utterance_idx,text\nc1,1,hello\n",
         r"missing column 'utterance' \(or 'speaker_uttr'\) \(found columns: conv_id, utterance_idx, text\)"),
        ("conv_id,utterance_idx,utterance\nc1,first,hello\n", "line 2: utterance_idx 'first' is not a number"),
        ('{"utterance": "hi"}', "not CSV"),
    ],
)
def test_dialogue_openers_errors(tmp_path, content, expected):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(InputFileError, match=expected) as error:
        load_dialogue_openers(path)
    assert one_line(error).startswith(str(path) + ": ")


def test_crlf_line_endings_and_numeric_utterance_order(tmp_path):
    ed = (
        "conv_id,utterance_idx,speaker_idx,utterance\r\n"
        "c1,10,1,Tenth.\r\n"
        "c1,9,2,Ninth_comma_ first here.\r\n"
        "c2,1,1,\"Quoted_comma_ never closed\r\n"
    )
    assert load_dialogue_openers(write(tmp_path / "ed.csv", ed)) == [
        "Ninth, first here.", "\"Quoted, never closed",  # 9 < 10 as numbers, not as strings
    ]
    big5 = "trait,level,train_input,train_output\r\nOpenness,LOW,Try sushi?,\"No, thanks.\"\r\n"
    assert load_big5_chat(write(tmp_path / "b.csv", big5)) == [
        DialogueExample("openness", "low", "Try sushi?", "No, thanks.")
    ]
